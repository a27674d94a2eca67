"""Weight formats a stage can load its slice in: float32, bfloat16, int8 and int4.

A format applies to the decoder blocks' ``nn.Linear`` layers of a stage (attention and MLP
projections: 80 % of SmolLM2-135M's weights); embeddings, norms and the LM head keep the
checkpoint's float32, except under ``bfloat16``, which casts the whole slice. Activations
between stages stay float32 in every format, so stages in different formats chain freely.

What runs where (measured on this project's CPU with torch 2.13 and torchao 0.18, see
docs/quantization.md):

* ``float32``, ``bfloat16``: every device (plain ``Module.to``).
* ``int8``: on CPU torch's own dynamic int8 (``torch.ao.quantization.quantize_dynamic``: int8
  weights per output channel, activations quantized per step, fbgemm/x86 kernels); torchao's
  ``Int8WeightOnlyConfig`` ran slower than float32 here. On CUDA torchao's
  ``Int8WeightOnlyConfig`` (needs ``pip install torchao``; not run on a GPU by this project yet).
* ``int4``: CUDA only, torchao's ``Int4WeightOnlyConfig`` (group 128). torchao 0.18 has no CPU
  int4 kernel here (it needs ``mslk``; its fallback stores int4 unpacked in int8 and ran 30x
  slower than float32), so int4 is refused on CPU with one line.

Byte counts per format (:func:`linear_bytes`) are the weights as stored: int8 one byte per
weight plus a float64 scale and int64 zero point per output channel (fbgemm's per-channel
quantizer); int4 half a byte per weight plus a bfloat16 scale and zero per group of 128.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

from noodle.errors import ExecutorError, SpecError

__all__ = ["FORMATS", "INT4_GROUP", "device_kind", "format_problem", "check_format", "linear_bytes",
           "quantize_blocks", "apply_format"]

FORMATS: tuple[str, ...] = ("float32", "bfloat16", "int8", "int4")
INT4_GROUP = 128
_RUNS_ON: dict[str, tuple[str, ...]] = {
    "float32": ("cpu", "cuda"),
    "bfloat16": ("cpu", "cuda"),
    "int8": ("cpu", "cuda"),
    "int4": ("cuda",),
}
_WHY_NOT = {
    ("int4", "cpu"): "torchao 0.18 has no CPU int4 kernel (its fallback stores int4 unpacked and runs ~30x slower "
                     "than float32); use int8 or bfloat16 on CPU",
}


def device_kind(device: str) -> str:
    """``cuda`` for a device string that names a GPU (``cuda:0``, ``rtx-4090-gpu``), else ``cpu``."""
    low = device.lower()
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


def linear_bytes(out_features: int, in_features: int, fmt: str) -> int:
    """Bytes of one Linear weight ``(out, in)`` stored in ``fmt`` (bias not included)."""
    n = out_features * in_features
    if fmt == "float32":
        return 4 * n
    if fmt == "bfloat16":
        return 2 * n
    if fmt == "int8":
        return n + 16 * out_features
    if fmt == "int4":
        groups = -(-in_features // INT4_GROUP)
        return (n + 1) // 2 + out_features * groups * 4
    raise SpecError(f"unknown format {fmt!r}; formats are {', '.join(FORMATS)}")


def quantize_blocks(blocks: list[Any], fmt: str, device: str = "cpu") -> None:
    """Quantize the ``nn.Linear`` layers of ``blocks`` in place to ``fmt`` (int8 or int4)."""
    import torch

    kind = device_kind(device)
    for i, block in enumerate(blocks):
        if fmt == "int8" and kind == "cpu":
            torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines \
                else torch.backends.quantized.supported_engines[-1]
            spec = {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
            with warnings.catch_warnings():  # torch deprecates the quantized dtypes that fbgemm's kernels use
                warnings.simplefilter("ignore")
                q = torch.ao.quantization.quantize_dynamic(block, spec, dtype=torch.qint8, inplace=True)
            if q is not block:  # quantize_dynamic returns the same module when inplace
                blocks[i] = q
        else:
            import torchao.quantization as tq

            config = tq.Int8WeightOnlyConfig() if fmt == "int8" else tq.Int4WeightOnlyConfig(group_size=INT4_GROUP)
            tq.quantize_(block, config)


def apply_format(slice_: Any, fmt: str, device: str = "cpu", where: str = "stage") -> None:
    """Put a :class:`~noodle.executors.slicing.ModelSlice` in ``fmt`` in place (see the module docstring).

    Raises:
        ExecutorError: ``fmt`` cannot run on ``device``.
    """
    import torch

    check_format(fmt, device, where)
    if fmt == "float32":
        return
    if fmt == "bfloat16":
        for mod in slice_.modules():
            if mod is not slice_.rotary:  # rotary tables stay float32 and follow the input's dtype
                mod.to(torch.bfloat16)
        return
    blocks = [b for _, b in slice_.blocks]
    quantize_blocks(blocks, fmt, device)
    slice_.blocks = [(i, b) for (i, _), b in zip(slice_.blocks, blocks)]
