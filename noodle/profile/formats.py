"""Profiles per weight format: ``noodle profile --formats float32,int8`` (see docs/quantization.md).

The float32 profile is the usual one. For each other format the model is put in that format
the way a stage loads it (:func:`noodle.models.quant.quantize_blocks`, or a bfloat16 cast), profiled
again into ``<out>/formats/<format>/``, and its per-unit decode and prefill figures are written
into the main ``units.json`` under ``formats`` (older readers ignore the key; older profiles have none).

``param_bytes`` per format is the float32 figure with every block's Linear weights counted as
(and the LM head's) stored in that format (:func:`noodle.formats.linear_bytes`), since a quantized Linear's packed
weights are not module parameters the hooks could count; under bfloat16 every float weight halves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from noodle.formats import HEAD_FORMAT, linear_bytes

__all__ = ["put_in_format", "format_param_bytes", "merge_format_units"]


def put_in_format(model: Any, fmt: str, device: str = "cpu") -> None:
    """Put a whole causal LM in ``fmt`` in place, as its stages would load it."""
    import torch

    from noodle.models import layout_of
    from noodle.models.quant import check_format, quantize_blocks, quantize_head

    check_format(fmt, device, "--formats")
    if fmt == "float32":
        return
    if fmt == "bfloat16":
        model.to(torch.bfloat16)
        return
    layout = layout_of(model)
    blocks = [model.get_submodule(p) for p in layout.blocks]
    quantize_blocks(blocks, fmt, device)
    head = model.get_submodule(layout.lm_head)
    if isinstance(head, torch.nn.Linear):
        model.set_submodule(layout.lm_head, quantize_head(head, fmt, device))


def format_param_bytes(model: Any, float32_bytes: list[int], fmt: str) -> list[int]:
    """Per-unit weight bytes in ``fmt`` from the float32 model and its per-unit float32 bytes."""
    import torch

    from noodle.models import layout_of

    if fmt == "float32":
        return list(float32_bytes)
    if fmt == "bfloat16":
        return [b // 2 for b in float32_bytes]
    layout = layout_of(model)
    out = list(float32_bytes)
    for i, path in enumerate(layout.blocks):
        for mod in model.get_submodule(path).modules():
            if isinstance(mod, torch.nn.Linear):
                o, n = mod.weight.shape
                out[i + 1] += linear_bytes(o, n, fmt) - linear_bytes(o, n, "float32")
    head = model.get_submodule(layout.lm_head)
    if isinstance(head, torch.nn.Linear):
        o, n = head.weight.shape
        out[-1] += linear_bytes(o, n, HEAD_FORMAT.get(fmt, fmt)) - linear_bytes(o, n, "float32")
    return out


def merge_format_units(main: Path, fmt: str, folder: Path, param_bytes: list[int]) -> None:
    """Write ``fmt``'s per-unit figures from the profile in ``folder`` into ``main``/units.json."""
    path = main / "units.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    mine = json.loads((folder / "units.json").read_text(encoding="utf-8"))
    rows = [{"name": u["name"], "latency_ms": u["latency_ms"], "prefill_ms_per_token": u.get("prefill_ms_per_token"),
             "param_bytes": b} for u, b in zip(mine["units"], param_bytes)]
    doc.setdefault("formats", {})[fmt] = {"source": str(folder.relative_to(main)), "units": rows}
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
