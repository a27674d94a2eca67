"""Optional parts of the install: planning is the core, execution is ``pip install 'noodle[exec]'``.

``TESTED_TRANSFORMERS`` is the range the conformance subset passes on: ``make test-deps-min`` runs its
floor, ``constraints.txt`` pins its newest release. Below the floor a command refuses in one line;
past the newest tested minor release it warns in one line and runs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re

from noodle.errors import DependencyMissing

__all__ = ["EXEC_MODULES", "TESTED_TRANSFORMERS", "check_transformers", "require_exec", "tested_span"]

EXEC_MODULES = ("torch", "transformers", "safetensors", "grpc")
# (floor, newest tested release). 5.17-5.23 pass the staged conformance (noodle.models.compat) but give
# wrong tokens for packed gptj/codegen steps (continuous batching); 5.16 and older lack the masks' layer_idx.
TESTED_TRANSFORMERS: tuple[str, str] = ("5.25.0", "5.25.0")


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string ("5.25.0.dev0" -> (5, 25, 0))."""
    parts = []
    for piece in version.split(".")[:3]:
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits[0]))
    return tuple(parts)


def tested_span() -> str:
    """The tested transformers range in words ("5.25.0", or "5.24.0 to 5.25.0")."""
    floor, newest = TESTED_TRANSFORMERS
    return floor if floor == newest else f"{floor} to {newest}"


def check_transformers(version: str | None = None) -> str | None:
    """Refuse a transformers older than the tested floor; a warning line for one newer than tested.

    Args:
        version: the version to judge; the installed one when None (read from its metadata, not imported).

    Raises:
        DependencyMissing: the version is older than ``TESTED_TRANSFORMERS[0]`` (its internals differ).
    """
    if version is None:
        try:
            version = importlib.metadata.version("transformers")
        except importlib.metadata.PackageNotFoundError:
            return None
    floor, newest = TESTED_TRANSFORMERS
    span = tested_span()
    if _release(version) < _release(floor):
        raise DependencyMissing(
            f"transformers {version} is older than noodle is tested on ({span}); "
            f"install a tested one: pip install 'transformers>={floor},<6'"
        )
    if _release(version)[:2] > _release(newest)[:2]:
        return f"transformers {version} is newer than noodle is tested on ({span}); staged results are unchecked there"
    return None


def require_exec(what: str) -> None:
    """Refuse in one line (exit 4) when the execution extra is missing; planning never calls this.

    A transformers newer than the tested range gets a one-line warning.

    Raises:
        DependencyMissing: naming the missing modules and the install command, or a transformers
            older than the tested range.
    """
    missing = [m for m in EXEC_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise DependencyMissing(
            f"{what} needs {', '.join(missing)}, which a planning-only install leaves out; "
            "install the execution extra: pip install 'noodle[exec]'"
        )
    newer = check_transformers()
    if newer:
        logging.getLogger(__name__).warning(newer)
