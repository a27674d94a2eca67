"""The transformers versions noodle is tested on, and the one call whose signature they differ in.

``TESTED_TRANSFORMERS`` is the range the conformance subset passes on (``make test-deps-min`` runs the
floor, ``constraints.txt`` pins the newest). Below the floor a command refuses in one line; above the
newest tested release it warns in one line and runs.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import re
from functools import lru_cache
from typing import Any

from noodle.errors import DependencyMissing

__all__ = ["TESTED_TRANSFORMERS", "check_transformers", "make_mask"]

# (floor, newest tested release): floor <= version, and versions past the newest get a warning.
TESTED_TRANSFORMERS: tuple[str, str] = ("5.17.0", "5.25.0")

log = logging.getLogger("noodle")


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string ("5.25.0.dev0" -> (5, 25, 0))."""
    parts = []
    for piece in version.split(".")[:3]:
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits[0]))
    return tuple(parts)


def check_transformers(version: str | None = None) -> str | None:
    """Refuse a transformers older than the tested floor; return a warning line for one newer than tested.

    Args:
        version: the version to judge; the installed one when None.

    Raises:
        DependencyMissing: the version is below ``TESTED_TRANSFORMERS[0]`` (its internals differ).
    """
    if version is None:
        try:
            version = importlib.metadata.version("transformers")
        except importlib.metadata.PackageNotFoundError:
            return None  # require_exec names what is missing
    floor, newest = TESTED_TRANSFORMERS
    span = f"{floor} to {newest}"
    if _release(version) < _release(floor):
        raise DependencyMissing(
            f"transformers {version} is older than noodle is tested on ({span}); "
            f"install a tested one: pip install 'transformers>={floor},<6'"
        )
    if _release(version)[:2] > _release(newest)[:2]:
        return f"transformers {version} is newer than noodle is tested on ({span}); staged results are unchecked there"
    return None


@lru_cache(maxsize=None)
def _cache_keyword(func: Any) -> str:
    """The name a mask builder takes the KV cache under (``cache`` from 5.24, ``past_key_values`` before)."""
    params = inspect.signature(func).parameters
    return "cache" if "cache" in params else "past_key_values"


def make_mask(kind_func: str, config: Any, hidden: Any, mask: Any, cache: Any, positions: Any, layer: int) -> Any:
    """transformers' 4-D mask builder ``kind_func`` (``create_causal_mask`` ...), whatever its cache keyword."""
    import transformers.masking_utils as mu

    func = getattr(mu, kind_func)
    return func(config=config, inputs_embeds=hidden, attention_mask=mask, position_ids=positions, layer_idx=layer,
                **{_cache_keyword(func): cache})  # fmt: skip
