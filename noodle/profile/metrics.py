"""Pure functions that turn raw profiling samples into metrics.

Nothing here touches a model while it runs: percentiles, latency statistics,
parameter and byte counts, the KV-cache size a config implies, coverage and
bottleneck ranking. Everything is tested alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PHASES",
    "LatencyStats",
    "percentile",
    "latency_stats",
    "dtype_bytes",
    "kv_bytes_per_token",
    "param_stats",
    "tensor_bytes",
    "leaf_coverage",
    "bottlenecks",
]

PHASES: tuple[str, ...] = ("prefill", "decode")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between ranks.

    Same definition as ``numpy.percentile(values, q)`` (method ``linear``):
    the value at rank ``q/100 * (n - 1)`` of the sorted samples.

    Raises:
        ValueError: no values, or ``q`` outside ``[0, 100]``.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    xs = sorted(values)
    rank = q / 100.0 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    frac = rank - lo
    return xs[lo] + (xs[hi] - xs[lo]) * frac


@dataclass(frozen=True)
class LatencyStats:
    """Latency samples of one unit or module in one phase, in milliseconds."""

    count: int
    mean: float
    std: float
    min: float
    p50: float
    p95: float
    p99: float
    max: float

    def as_row(self, prefix: str = "latency_ms_") -> dict[str, float | int]:
        """Flat columns (``latency_ms_mean`` ...) for a JSONL row."""
        row: dict[str, float | int] = {"count": self.count}
        for key in ("mean", "std", "min", "p50", "p95", "p99", "max"):
            row[prefix + key] = round(getattr(self, key), 6)
        return row


def latency_stats(samples: Sequence[float]) -> LatencyStats:
    """Mean, population standard deviation, min, p50/p95/p99 and max of ``samples``."""
    if not samples:
        raise ValueError("latency_stats of no samples")
    n = len(samples)
    mean = sum(samples) / n
    var = sum((x - mean) ** 2 for x in samples) / n
    return LatencyStats(
        count=n,
        mean=mean,
        std=math.sqrt(var),
        min=min(samples),
        p50=percentile(samples, 50),
        p95=percentile(samples, 95),
        p99=percentile(samples, 99),
        max=max(samples),
    )


def dtype_bytes(dtype: Any) -> int:
    """Bytes of one element of a torch dtype."""
    import torch

    if dtype.is_floating_point:
        return torch.finfo(dtype).bits // 8
    if dtype == torch.bool:
        return 1
    return torch.iinfo(dtype).bits // 8


def kv_bytes_per_token(config: Any, element_bytes: int) -> int:
    """KV-cache bytes one decoder block stores per token of context (one sequence).

    ``2 (K and V) * num_kv_heads * head_dim * element_bytes``; ``num_kv_heads``
    falls back to the number of attention heads (no grouped-query attention) and
    ``head_dim`` to ``hidden_size / num_attention_heads``.
    """
    heads = int(config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * int(kv_heads) * int(head_dim) * element_bytes


def param_stats(modules: Iterable[Any]) -> tuple[int, int]:
    """(number of parameters, bytes) of the distinct parameters of ``modules``.

    A weight shared by two of the modules counts once; a weight shared with a
    module outside the list (a tied LM head) counts here too, because a stage
    holding only these modules needs its own copy.
    """
    seen: set[int] = set()
    count = nbytes = 0
    for module in modules:
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            count += p.numel()
            nbytes += p.numel() * p.element_size()
    return count, nbytes


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Total bytes of ``tensors``."""
    return sum(t.numel() * t.element_size() for t in tensors)


def leaf_coverage(leaves: Sequence[str], timed: Iterable[str]) -> dict[str, Any]:
    """How many leaf modules have latency samples, and which do not."""
    timed_set = set(timed)
    missing = [name for name in leaves if name not in timed_set]
    total = len(leaves)
    done = total - len(missing)
    return {
        "timed": done,
        "total": total,
        "percent": round(100.0 * done / total, 2) if total else 100.0,
        "not_timed": missing,
    }


def bottlenecks(latency_ms: Mapping[str, float], top: int = 3) -> list[dict[str, Any]]:
    """The ``top`` largest latencies with their share of the sum, largest first."""
    total = sum(latency_ms.values())
    ranked = sorted(latency_ms.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [
        {"name": name, "latency_ms": round(ms, 6), "share": round(ms / total, 6) if total > 0 else 0.0}
        for name, ms in ranked
    ]
