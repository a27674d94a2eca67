"""Weight formats: names, which device kinds run them, and their bytes (planning needs no torch).

How a stage applies a format, and what each one runs on, is in :mod:`noodle.models.quant`.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from noodle.errors import ExecutorError, SpecError

__all__ = ["FormatName", "FORMATS", "HEAD_FORMAT", "INT4_GROUP", "kernel_fits", "device_kind", "format_problem", "check_format", "linear_bytes"]

FormatName = Literal["float32", "bfloat16", "int8", "int4"]
FORMATS: tuple[FormatName, ...] = ("float32", "bfloat16", "int8", "int4")
INT4_GROUP = 64
HEAD_FORMAT = {"int4": "int8"}  # the LM head's format where it differs from the stage's (noodle.models.quant)
_RUNS_ON: dict[str, tuple[str, ...]] = {
    "float32": ("cpu", "cuda", "mps"),
    "bfloat16": ("cpu", "cuda", "mps"),
    "int8": ("cpu", "cuda"),
    "int4": ("cpu", "cuda"),
}
_WHY_NOT: dict[tuple[str, str], str] = {
    ("int8", "mps"): "torch has no int8 weight-only kernel for mps; use bfloat16 or float32 there",
    ("int4", "mps"): "torch has no int4 weight-only kernel for mps; use bfloat16 or float32 there",
}


def device_kind(device: str) -> str:
    """``mps`` for an Apple GPU (``mps``), ``cuda`` for a device string that names another GPU (``cuda:0``,
    ``rtx-4090-gpu``), else ``cpu``."""
    low = device.lower()
    if "mps" in low:
        return "mps"
    return "cuda" if any(w in low for w in ("cuda", "gpu")) else "cpu"


def format_problem(fmt: str, device: str) -> str | None:
    """Why ``fmt`` cannot run on ``device``, or None when it can."""
    if fmt not in FORMATS:
        return f"unknown format {fmt!r}; formats are {', '.join(FORMATS)}"
    kind = device_kind(device)
    if kind not in _RUNS_ON[fmt]:
        why = _WHY_NOT.get((fmt, kind), f"{fmt} runs on {', '.join(_RUNS_ON[fmt])}")
        return f"format {fmt} cannot run on {kind} device {device!r}: {why}"
    if kind == "cuda" and fmt in ("int8", "int4") and importlib.util.find_spec("torchao") is None:
        return f"format {fmt} on {device!r} needs torchao's CUDA kernels: pip install 'noodle[gpu-quant]'"
    return None


def check_format(fmt: str, device: str, where: str) -> None:
    """Refuse ``fmt`` on ``device`` in one line.

    Raises:
        ExecutorError: the format is unknown or has no kernel on that device.
    """
    wrong = format_problem(fmt, device)
    if wrong:
        raise ExecutorError(f"{where}: {wrong}")


def kernel_fits(out_features: int, in_features: int, fmt: str) -> bool:
    """Whether torch's CPU kernel takes a Linear of this shape in ``fmt`` (else the layer stays float32).

    ``_weight_int8pack_mm`` crashes (segfault, torch 2.13) on an input width that is not a multiple of 16;
    int4 packing needs whole groups along the input and output rows in multiples of 16.
    """
    if fmt == "int8":
        return in_features % 16 == 0
    if fmt == "int4":
        return in_features % INT4_GROUP == 0 and out_features % 16 == 0
    return True


def linear_bytes(out_features: int, in_features: int, fmt: str) -> int:
    """Bytes of one Linear weight ``(out, in)`` stored in ``fmt`` (bias not included)."""
    n = out_features * in_features
    if fmt == "float32":
        return 4 * n
    if fmt == "bfloat16":
        return 2 * n
    if fmt in ("int8", "int4") and not kernel_fits(out_features, in_features, fmt):
        return 4 * n  # stays float32 (see noodle.models.quant)
    if fmt == "int8":
        return n + 2 * out_features  # bfloat16 scale per output channel
    if fmt == "int4":
        return n // 2 + out_features * (in_features // INT4_GROUP) * 4  # bfloat16 scale and zero per group
    raise SpecError(f"unknown format {fmt!r}; formats are {', '.join(FORMATS)}")
