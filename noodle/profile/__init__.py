"""Profile a causal LM unit by unit: hooks, metrics, JSONL log, engine, dashboard.

The output folder feeds the planner through :func:`load_units`.
"""

from noodle.profile.engine import ObservabilityEngine, ProfileConfig, ProfileInputs
from noodle.profile.hooks import STRATEGIES
from noodle.profile.metrics import LatencyStats, kv_bytes_per_token, latency_stats, percentile
from noodle.profile.report import ProfileReport
from noodle.profile.units import load_units

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
