"""Checks of command-line numbers shared by the commands (typer parses; these bound).

Every check raises :class:`~noodle.errors.SpecError` naming the flag, the value and the
accepted range; ``nan`` and ``inf`` are refused wherever a float is read.
"""

from __future__ import annotations

import math
import os
from typing import Any

from noodle.errors import SpecError

__all__ = ["MAX_SEED", "max_threads", "check_float", "check_int", "check_threads", "max_positions", "check_positions"]

MAX_SEED = 2**63 - 1
def max_threads() -> int:
    """The most ``--threads`` a command accepts: 4 x the CPUs of this machine, at most 1024."""
    return min(1024, 4 * (os.cpu_count() or 1))


def check_float(flag: str, value: float, *, gt: float | None = None, ge: float | None = None,
                le: float | None = None) -> float:
    """``value`` if finite and inside the bounds, else a SpecError naming ``flag``."""
    low = f"({gt:g}" if gt is not None else f"[{ge:g}" if ge is not None else "(-inf"
    want = f"in {low}, {le:g}]" if le is not None else f"in {low}, inf)"
    ok = math.isfinite(value) and (gt is None or value > gt) and (ge is None or value >= ge) and (le is None or value <= le)
    if not ok:
        raise SpecError(f"{flag}: must be a finite number {want}, got {value:g}")
    return value


def check_int(flag: str, value: int, *, ge: int, le: int) -> int:
    """``value`` if ``ge <= value <= le``, else a SpecError naming ``flag``."""
    if not ge <= value <= le:
        raise SpecError(f"{flag}: must be in [{ge}, {le}], got {value}")
    return value


def check_threads(flag: str, value: int, *, minimum: int = 0) -> int:
    """Thread counts: ``minimum`` (0 is torch's default) up to :func:`max_threads`."""
    top = max_threads()
    if not minimum <= value <= top:
        raise SpecError(
            f"{flag}: must be in [{minimum}, {top}] (at most 4 x the {os.cpu_count() or 1} CPUs, and 1024), got {value}"
        )
    return value


def max_positions(config: Any) -> int | None:
    """The longest context a transformers config's position embeddings cover, if it says."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(config: Any, prompt_tokens: int, new_tokens: int, *, where: str, flags: str) -> None:
    """Refuse a run whose prompt plus new tokens would pass the model's last position."""
    limit = max_positions(config)
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise SpecError(
            f"{flags}: {prompt_tokens} prompt + {new_tokens} new tokens = {prompt_tokens + new_tokens} positions, "
            f"but {where} has {limit} (max_position_embeddings); shorten the prompt or generate fewer tokens"
        )
