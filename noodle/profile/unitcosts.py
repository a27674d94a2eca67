"""A node's own unit costs, measured with the profiler engine (what ``noodle worker --join`` reports).

:func:`measure_unit_costs` runs :class:`~noodle.profile.engine.ObservabilityEngine` (the
engine behind ``noodle profile``: unit hooks, warm-up, medians) once per batch size on a
short workload and keeps, per placement unit in chain order: the median decode step at each
batch size, the median prefill time per prompt token (at the first batch size), the unit's
weight bytes and its KV-cache bytes per token and sequence. Each run's profile folder
(``metrics.jsonl``, ``units.json``, ...) is written under ``out_dir/b<batch>`` when given, so
the figures can be read back with :func:`~noodle.profile.load_units` as well.

The result is a JSON-ready mapping in the ``noodle.unit-costs/1`` format::

    {"format": "noodle.unit-costs/1", "batch_size": 1, "prompt_tokens": 32, "dtype": "float32",
     "units": [{"name": "embed", "decode_ms": {"1": 0.02}, "prefill_ms_per_token": 0.001,
                "param_bytes": 1024, "kv_bytes_per_token": 0}, ...]}
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from noodle.errors import SpecError
from noodle.profile.engine import ObservabilityEngine, ProfileConfig

__all__ = ["UNIT_COSTS_FORMAT", "measure_unit_costs"]

UNIT_COSTS_FORMAT = "noodle.unit-costs/1"


def _engine_device(device: str) -> str:
    """The engine's device name for a torch device string (``cuda:N`` selects that GPU)."""
    kind, _, index = device.partition(":")
    if kind == "cuda" and index:
        import torch

        torch.cuda.set_device(int(index))
    if kind not in ("cpu", "cuda"):
        raise SpecError(f"--device: {device!r}: per-unit costs are measured on cpu or cuda devices")
    return kind


def measure_unit_costs(model: Any, device: str = "cpu", *, batch_sizes: Sequence[int] = (1,), prompt_tokens: int = 32,
                       decode_tokens: int = 8, warmup: int = 1, iterations: int = 4,
                       out_dir: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Time ``model``'s units on ``device`` at each of ``batch_sizes`` (see the module docstring).

    Raises:
        SpecError: an empty or non-positive ``batch_sizes``, or a device the engine cannot time.
    """
    sizes = list(dict.fromkeys(int(b) for b in batch_sizes))
    if not sizes or min(sizes) < 1:
        raise SpecError(f"batch_sizes: {list(batch_sizes)}; give one or more sizes of at least 1")
    kind = _engine_device(device)
    with tempfile.TemporaryDirectory(prefix="noodle-unit-costs-") as tmp:
        base = Path(out_dir) if out_dir is not None else Path(tmp)
        docs = {}
        for b in sizes:
            config = ProfileConfig(model_name="unit-costs", prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
                                   batch_size=b, warmup=warmup, iterations=iterations, module_iterations=0,
                                   device=kind)  # fmt: skip
            engine = ObservabilityEngine(model, base / f"b{b}", config)
            try:
                inputs = engine.make_inputs()
                engine.warmup(inputs)
                docs[b] = engine.profile(inputs).unit_doc
            finally:
                engine.remove()
    first = docs[sizes[0]]
    units = []
    for i, row in enumerate(first["units"]):
        units.append({
            "name": row["name"],
            "decode_ms": {str(b): float(docs[b]["units"][i]["latency_ms"]) for b in sizes},
            "prefill_ms_per_token": float(row["prefill_ms_per_token"]),
            "param_bytes": int(row["param_bytes"]),
            "kv_bytes_per_token": int(row["kv_bytes_per_token"]),
        })  # fmt: skip
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    workload = first.get("workload") or {}
    return {"format": UNIT_COSTS_FORMAT, "batch_size": sizes[0], "prompt_tokens": int(workload.get("prompt_tokens", prompt_tokens)),
            "dtype": dtype, "units": units}  # fmt: skip
