"""Checks of command-line numbers shared by the commands (typer parses; these bound).

Every check raises :class:`~noodle.errors.SpecError` naming the flag, the value and the
accepted range; ``nan`` and ``inf`` are refused wherever a float is read.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from noodle.errors import SpecError

__all__ = ["MAX_SEED", "max_threads", "check_float", "check_int", "check_threads", "max_positions", "check_positions",
           "read_token_file", "MAX_TOKEN_BYTES"]

MAX_SEED = 2**63 - 1
MAX_TOKEN_BYTES = 4096


def read_token_file(token: str | None, token_file: Path | None) -> str | None:
    """``--token-file``'s token (read, stripped), else ``token``; a SpecError for an unusable file.

    Refuses both given (``--token``/``NOODLE_TOKEN`` and the file), an unreadable, empty or oversized file,
    and a token with characters an HTTP or gRPC header cannot carry.
    """
    if token_file is None:
        return token
    if token:
        raise SpecError("--token-file: give the token once, by --token (or NOODLE_TOKEN) or by --token-file, not both")
    try:
        with token_file.open("rb") as f:
            data = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"--token-file: cannot read {token_file} ({exc.strerror or exc})") from None
    if len(data) > MAX_TOKEN_BYTES:
        raise SpecError(f"--token-file: {token_file} is over {MAX_TOKEN_BYTES} bytes; it should hold only the token")
    text = data.decode("ascii", errors="replace").strip()
    if not text:
        raise SpecError(f"--token-file: {token_file} is empty; write the cluster token into it")
    bad = next((i for i, ch in enumerate(text) if not "!" <= ch <= "~"), None)
    if bad is not None:
        raise SpecError(f"--token-file: {token_file}: character {bad + 1} of the token is not printable ASCII "
                        "(a header cannot carry it); e.g. `openssl rand -hex 32`")  # fmt: skip
    return text


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
