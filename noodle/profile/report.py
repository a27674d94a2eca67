"""Assemble a profile run into rows (``metrics.jsonl``), a summary and planner units.

Row kinds in ``metrics.jsonl`` (one JSON object per line):

* ``run``: once, first: model, workload, strategy, timer, memory source, reference device;
* ``unit``: one per placement unit and phase (latency stats, memory, parameters, shapes,
  bytes out, KV bytes per token, ``handoff_bytes`` the planner uses as activation bytes);
* ``module``: one per timed module and phase (same columns, plus ``unit`` and ``is_leaf``);
* ``model``: one per phase, the whole forward (wall time around ``model(...)``);
* ``memory``: the memory timeline of the traced iteration, one row per unit-module exit.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noodle.profile.hooks import TraceRecord, timed_modules
from noodle.profile.jsonl import to_json_value, write_jsonl
from noodle.profile.metrics import (
    PHASES,
    bottlenecks,
    dtype_bytes,
    kv_bytes_per_token,
    latency_stats,
    leaf_coverage,
    param_stats,
)
from noodle.profile.system import device_description
from noodle.profile.units import unit_document, units_from_document
from noodle.types import Unit

__all__ = ["RunData", "ProfileReport", "build_report", "TOKEN_ID_BYTES"]

TOKEN_ID_BYTES = 8  # the last stage hands back a sampled token id (int64)


@dataclass(frozen=True)
class RunData:
    """Everything a profile run collected, handed from the engine to :func:`build_report`."""

    model: Any
    layout: Any
    config: Any
    inputs: Any
    iterations: int
    samples: dict[tuple[str, str, str], list[float]]
    traces: dict[str, dict[str, dict[str, TraceRecord]]]
    timeline: list[dict[str, Any]]
    system: dict[str, Any]
    timer: str
    memory_source: str
    module_source: str | None


@dataclass(frozen=True)
class ProfileReport:
    """The result of :meth:`ObservabilityEngine.profile`.

    Attributes:
        rows: the ``metrics.jsonl`` rows.
        summary: the ``summary.json`` document.
        unit_doc: the ``units.json`` document.
        units: the planner's units (reference device = this machine).
    """

    rows: tuple[dict[str, Any], ...]
    summary: dict[str, Any]
    unit_doc: dict[str, Any]
    units: tuple[Unit, ...]

    def rows_of(self, kind: str, phase: str | None = None) -> list[dict[str, Any]]:
        """Rows of one kind (``unit``, ``module``, ``model``, ``memory``), optionally one phase."""
        return [r for r in self.rows if r["kind"] == kind and (phase is None or r.get("phase") == phase)]

    def write(self, folder: str | Path) -> dict[str, Path]:
        """Write ``metrics.jsonl``, ``summary.json`` and ``units.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"metrics": write_jsonl(folder / "metrics.jsonl", self.rows)}
        for key, name, doc in (("summary", "summary.json", self.summary), ("units", "units.json", self.unit_doc)):
            paths[key] = folder / name
            paths[key].write_text(json.dumps(to_json_value(doc), indent=2) + "\n")
        return paths


def _text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _trace_fields(rec: TraceRecord | None) -> dict[str, Any]:
    if rec is None:
        return {"input_shapes": None, "output_shapes": None, "activation_bytes_out": None}
    return {
        "input_shapes": rec.input_shapes,
        "output_shapes": rec.output_shapes,
        "activation_bytes_out": rec.activation_bytes_out,
    }


def _unit_rows(data: RunData) -> list[dict[str, Any]]:
    model, layout = data.model, data.layout
    cfg = _text_config(model)
    elem = dtype_bytes(next(model.parameters()).dtype)
    kv = kv_bytes_per_token(cfg, elem)
    rows = []
    for index, (unit, paths) in enumerate(layout.unit_modules().items()):
        mods = [model.get_submodule(p) for p in paths]
        n_params, n_bytes = param_stats(mods)
        is_block = unit.startswith("block.")
        static = {
            "index": index,
            "modules": list(paths),
            "module_type": "+".join(dict.fromkeys(type(m).__name__ for m in mods)),
            "num_parameters": n_params,
            "param_bytes": n_bytes,
            "kv_bytes_per_token": kv if is_block else 0,
            "handoff_bytes": TOKEN_ID_BYTES if unit == "lm_head" else int(cfg.hidden_size) * elem,
        }
        for phase in PHASES:
            samples = data.samples.get(("unit", unit, phase), [])
            rec = data.traces.get(phase, {}).get("unit", {}).get(unit)
            row: dict[str, Any] = {"kind": "unit", "name": unit, "phase": phase, **static}
            row.update(latency_stats(samples).as_row() if samples else {"count": 0})
            row.update(_trace_fields(rec))
            row["memory_after_bytes"] = rec.memory_after_bytes if rec else None
            row["peak_memory_bytes"] = rec.peak_memory_bytes if rec else None
            rows.append(row)
    return rows


def _owner(layout: Any, name: str) -> str:
    """Unit of a module; ``shared`` for helpers every stage copies, ``model`` for containers."""
    unit = layout.unit_of_module(name)
    if unit is not None:
        return unit
    return "shared" if any(name == s or name.startswith(s + ".") for s in layout.shared) else "model"


def _module_rows(data: RunData) -> tuple[list[dict[str, Any]], list[str]]:
    rows, leaves = [], []
    for name, mod in timed_modules(data.model):
        is_leaf = next(mod.children(), None) is None
        if is_leaf:
            leaves.append(name)
        n_params, n_bytes = param_stats([mod])
        for phase in PHASES:
            samples = data.samples.get(("module", name, phase))
            if not samples:
                continue
            row: dict[str, Any] = {
                "kind": "module",
                "name": name,
                "phase": phase,
                "unit": _owner(data.layout, name),
                "module_type": type(mod).__name__,
                "is_leaf": is_leaf,
                "num_parameters": n_params,
                "param_bytes": n_bytes,
                **latency_stats(samples).as_row(),
                **_trace_fields(data.traces.get(phase, {}).get("module", {}).get(name)),
            }
            rows.append(row)
    return rows, leaves


def _header(data: RunData) -> dict[str, Any]:
    inputs, cfg = data.inputs, data.config
    return {
        "kind": "run",
        "model": cfg.model_name,
        "model_type": getattr(data.model.config, "model_type", None),
        "source": cfg.source,
        "strategy": cfg.strategy,
        "workload": {
            "prompt_tokens": inputs.prompt_tokens,
            "decode_tokens": inputs.decode_tokens,
            "batch_size": inputs.batch_size,
        },
        "iterations": data.iterations,
        "warmup": cfg.warmup,
        "module_breakdown": data.module_source,
        "dtype": str(next(data.model.parameters()).dtype).replace("torch.", ""),
        "timer": data.timer,
        "memory_source": data.memory_source,
        "units": data.layout.unit_names,
        "reference_device": {
            "description": device_description(data.system),
            "compute_score": 1.0,
            "device": data.system.get("device"),
            "hostname": data.system.get("hostname"),
        },
        "latency_stat": "p50 of the unit's decode-step latency (ms)",
    }


def _summary(header: dict[str, Any], rows: list[dict[str, Any]], leaves: list[str]) -> dict[str, Any]:
    units = [r for r in rows if r["kind"] == "unit"]
    modules = [r for r in rows if r["kind"] == "module"]
    phases: dict[str, Any] = {}
    for phase in PHASES:
        fwd = next((r for r in rows if r["kind"] == "model" and r["phase"] == phase), None)
        timed = [r for r in units if r["phase"] == phase and r["count"]]
        mean_sum = sum(r["latency_ms_mean"] for r in timed)
        phases[phase] = {
            "forward_ms_mean": fwd["latency_ms_mean"] if fwd else None,
            "forward_ms_p50": fwd["latency_ms_p50"] if fwd else None,
            "units_ms_p50_sum": round(sum(r["latency_ms_p50"] for r in timed), 6),
            # share of the forward's wall time that falls inside some unit (means add up)
            "attributed_share": round(mean_sum / fwd["latency_ms_mean"], 4) if fwd and fwd["latency_ms_mean"] else None,
            "bottlenecks": bottlenecks({r["name"]: r["latency_ms_p50"] for r in timed}, top=3),
        }
        by_type: dict[str, float] = defaultdict(float)
        for r in modules:
            if r["phase"] == phase and r["is_leaf"]:
                by_type[r["module_type"]] += r["latency_ms_mean"]
        phases[phase]["leaf_ms_by_type"] = {k: round(v, 6) for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])}
    measured = {r["name"] for r in units if r["count"]}
    names = header["units"]
    return {
        "model": header["model"],
        "strategy": header["strategy"],
        "workload": header["workload"],
        "iterations": header["iterations"],
        "reference_device": header["reference_device"],
        "timer": header["timer"],
        "memory_source": header["memory_source"],
        "module_breakdown": header["module_breakdown"],
        "latency_stat": header["latency_stat"],
        "bottlenecks": phases["decode"]["bottlenecks"],
        "phases": phases,
        "coverage": {
            "units": {
                "measured": sum(1 for n in names if n in measured),
                "total": len(names),
                "percent": round(100.0 * sum(1 for n in names if n in measured) / len(names), 2),
            },
            "leaf_modules": leaf_coverage(leaves, {r["name"] for r in modules}),
        },
        "units": [
            {
                "name": r["name"],
                "phase": r["phase"],
                "module_type": r["module_type"],
                "latency_ms_p50": r.get("latency_ms_p50"),
                "latency_ms_mean": r.get("latency_ms_mean"),
                "latency_ms_p95": r.get("latency_ms_p95"),
                "num_parameters": r["num_parameters"],
                "param_bytes": r["param_bytes"],
                "peak_memory_bytes": r["peak_memory_bytes"],
            }
            for r in units
        ],
    }


def build_report(data: RunData) -> ProfileReport:
    """Rows, summary and planner units of one profile run."""
    header = _header(data)
    rows: list[dict[str, Any]] = [header, *_unit_rows(data)]
    module_rows, leaves = _module_rows(data)
    rows.extend(module_rows)
    for phase in PHASES:
        samples = data.samples.get(("model", "forward", phase))
        if samples:
            rows.append({"kind": "model", "name": "forward", "phase": phase, **latency_stats(samples).as_row()})
    rows.extend({"kind": "memory", **event} for event in data.timeline)
    summary = _summary(header, rows, leaves)
    doc = unit_document(rows)
    return ProfileReport(rows=tuple(rows), summary=summary, unit_doc=doc, units=units_from_document(doc))

