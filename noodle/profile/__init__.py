"""Profile a causal LM unit by unit: hooks, metrics, JSONL log, engine, dashboard.

The output folder feeds the planner through :func:`load_units`. Names are imported on first use, so
reading a profile (:mod:`noodle.profile.units`, and :mod:`noodle.profile.pernode`, which prices stages with
each node's own profile: what planning needs) never imports torch or the engine.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "STRATEGIES",
    "ObservabilityEngine",
    "ProfileConfig",
    "ProfileInputs",
    "ProfileReport",
    "LatencyStats",
    "kv_bytes_per_token",
    "latency_stats",
    "percentile",
    "load_units",
]

_WHERE = {
    "ObservabilityEngine": "engine", "ProfileConfig": "engine", "ProfileInputs": "engine", "STRATEGIES": "hooks",
    "LatencyStats": "metrics", "kv_bytes_per_token": "metrics", "latency_stats": "metrics", "percentile": "metrics",
    "ProfileReport": "report", "load_units": "units",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'noodle.profile' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"noodle.profile.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
