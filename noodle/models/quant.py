"""Weight formats a stage can load its slice in: float32, bfloat16, int8 and int4.

A format applies to the ``nn.Linear`` layers of a stage: the decoder blocks' attention and MLP
projections and the LM head (a tied head gets its own quantized copy; the input embedding keeps
the float32 weight); embeddings and norms keep the checkpoint's float32, except under
``bfloat16``, which casts the whole slice. Activations
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

import warnings
from typing import Any

from noodle.formats import FORMATS, INT4_GROUP, check_format, device_kind, format_problem, linear_bytes

__all__ = ["FORMATS", "INT4_GROUP", "device_kind", "format_problem", "check_format", "linear_bytes",
           "quantize_blocks", "quantize_head", "apply_format"]


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


def quantize_head(head: Any, fmt: str, device: str = "cpu") -> Any:
    """The LM head ``nn.Linear`` in ``fmt`` (int8 or int4): a new module (a tied weight stays with the embedding)."""
    import torch

    holder = torch.nn.ModuleList([head])
    quantize_blocks([holder], fmt, device)
    return holder[0]


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
    if isinstance(slice_.head, torch.nn.Linear):
        slice_.head = quantize_head(slice_.head, fmt, device)
