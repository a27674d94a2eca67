"""Weight formats a stage can load its slice in: float32, bfloat16, int8 and int4.

A format applies to the ``nn.Linear`` layers of a stage: the decoder blocks' attention and MLP
projections and the LM head (a tied head gets its own quantized copy; the input embedding keeps
the float32 weight); embeddings and norms keep the checkpoint's float32, except under
``bfloat16``, which casts the whole slice. Activations between stages stay float32 in every
format, so stages in different formats chain freely.

What runs where (measured on this project's CPU with torch 2.13, see docs/quantization.md):

* ``float32``, ``bfloat16``: every device (plain ``Module.to``).
* ``int8`` (weight-only): on CPU torch's own kernel ``aten._weight_int8pack_mm`` (int8 weights,
  one bfloat16 scale per output channel, bfloat16 activations inside the layer; the kernel
  gpt-fast and torchao use on CPU). torch's ``quantize_dynamic`` (int8 activations too) was as
  fast but lost accuracy badly on SmolLM2 (perplexity 27 -> 90), and torchao 0.18's
  ``Int8WeightOnlyConfig`` ran slower than float32 on this CPU, so neither is used.
* ``int4`` (weight-only, groups of 64 along the input, asymmetric): on CPU torch's own
  ``aten._weight_int4pack_mm_for_cpu`` (packed two weights a byte, bfloat16 scale and zero per
  group). torchao 0.18's ``Int4WeightOnlyConfig`` has no CPU kernel here (it needs ``mslk``).
* On CUDA, int8 and int4 use torchao (``Int8WeightOnlyConfig``, ``Int4WeightOnlyConfig``) when it
  is installed, else they are refused; this project has not run them on a GPU yet.

Byte counts per format (:func:`noodle.formats.linear_bytes`) are the weights as stored.
"""

from __future__ import annotations

from typing import Any

import torch

from noodle.formats import FORMATS, HEAD_FORMAT, INT4_GROUP, check_format, kernel_fits, device_kind, format_problem, linear_bytes

__all__ = ["FORMATS", "INT4_GROUP", "device_kind", "format_problem", "check_format", "linear_bytes",
           "WeightOnlyLinear", "quantize_blocks", "quantize_head", "apply_format"]


class WeightOnlyLinear(torch.nn.Module):
    """An ``nn.Linear`` with int8 or int4 weights on torch's own CPU kernels (see the module docstring)."""

    def __init__(self, linear: torch.nn.Linear, fmt: str) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        n, k = w.shape
        self.fmt, self.in_features, self.out_features = fmt, k, n
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(), False)
        if fmt == "int8":
            scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
            self.register_buffer("weight_q", torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8))
            self.register_buffer("scales", scale.to(torch.bfloat16))
        else:
            g = INT4_GROUP
            wg = w.reshape(n, k // g, g)
            lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            q = torch.round((wg - lo) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
            zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
            self.register_buffer("weight_q", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8))
            sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous()
            self.register_buffer("scales", sz.to(torch.bfloat16))  # (groups, out, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.fmt == "int8":
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_q, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight_q, INT4_GROUP, self.scales)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, format={self.fmt}"


def _quantizable(mod: torch.nn.Module, fmt: str) -> bool:
    return isinstance(mod, torch.nn.Linear) and kernel_fits(mod.out_features, mod.in_features, fmt)


def quantize_blocks(blocks: list[Any], fmt: str, device: str = "cpu") -> None:
    """Quantize the ``nn.Linear`` layers of each module in ``blocks`` in place to ``fmt`` (int8 or int4).

    On CPU a layer whose shape torch's kernel cannot take (:func:`noodle.formats.kernel_fits`) stays float32.
    """
    if device_kind(device) == "cuda":
        import torchao.quantization as tq

        config = tq.Int8WeightOnlyConfig() if fmt == "int8" else tq.Int4WeightOnlyConfig(group_size=INT4_GROUP)
        for block in blocks:
            tq.quantize_(block, config)
        return
    for block in blocks:
        for name, mod in list(block.named_modules()):
            for child_name, child in list(mod.named_children()):
                if _quantizable(child, fmt):
                    setattr(mod, child_name, WeightOnlyLinear(child, fmt))


def quantize_head(head: Any, fmt: str, device: str = "cpu") -> Any:
    """The LM head ``nn.Linear`` in ``fmt``: a new module (a tied weight stays with the embedding).

    Under int4 the head takes int8 (:data:`noodle.formats.HEAD_FORMAT`), as llama.cpp's 4-bit files keep the
    output matrix at higher precision: in int4 it alone raised SmolLM2's perplexity by a third.
    """
    holder = torch.nn.ModuleList([head])
    quantize_blocks([holder], HEAD_FORMAT.get(fmt, fmt), device)
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
