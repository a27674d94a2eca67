"""Reference placements from the anchors, for comparison (status ``baseline``).

Each baseline is the split rule of a known system, applied to the units of any spec
(embedding and head are units like the blocks). None of them optimises anything; they
place units by a fixed rule and report the plan's cost under the same cost model. A
baseline whose rule puts a stage over its node's memory (or against a pin) returns no
plan and says which stage breaks which limit: the rule cannot place the model.

* ``baseline-uniform`` (PiPPy's even split, vLLM's default pipeline split): every usable
  node, in the order the cluster lists them, gets the same number of units (the first
  ones one more when it does not divide).
* ``baseline-params`` (DeepSpeed ``partition_method='parameters'``): the same nodes in the
  same order; boundaries minimise the largest per-stage parameter count (exact, by
  bisection over the answer with greedy packing, as DeepSpeed's ``partition_balanced``).
* ``baseline-memory`` (exo's memory-weighted ring, llama.cpp RPC's default tensor split):
  nodes sorted by memory, largest first; each gets a share of the units proportional to
  its memory (boundaries at the rounded cumulative shares).
* ``baseline-petals`` (Petals-style greedy per node): nodes by speed, fastest first; each
  takes as many of the next units as fit in its memory until the model is covered.

Every baseline uses at most ``max_stages`` nodes (the first ones in its own order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from noodle.solvers.base import SolveResult, SolverBase, plan_from_segments
from noodle.solvers.tables import CostTables, segments_value
from noodle.types import GIB, Plan, Problem

__all__ = ["BASELINES", "BaselineSolver", "uniform_split", "params_split", "memory_split", "petals_split"]


def _cuts_to_segments(order: list[int], cuts: list[int]) -> list[tuple[int, int, int]]:
    return [(j, a, b) for j, a, b in zip(order, cuts, cuts[1:]) if b > a]


def uniform_split(problem: Problem, tables: CostTables) -> list[tuple[int, int, int]]:
    n = tables.n
    k = min(len(tables.nodes), tables.max_stages, n)
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    return _cuts_to_segments(list(range(k)), [0, *np.cumsum(sizes).tolist()])


def params_split(problem: Problem, tables: CostTables) -> list[tuple[int, int, int]]:
    n = tables.n
    k = min(len(tables.nodes), tables.max_stages, n)
    w = [u.param_bytes for u in problem.units]

    def pack(limit: int) -> list[int] | None:
        cuts, acc = [0], 0
        for i, x in enumerate(w):
            if acc + x > limit and acc > 0:
                cuts.append(i)
                acc = 0
            acc += x
        cuts.append(n)
        return cuts if len(cuts) - 1 <= k else None

    lo, hi = max(w), sum(w)
    while lo < hi:
        mid = (lo + hi) // 2
        if pack(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    cuts = pack(lo) or [0, n]
    return _cuts_to_segments(list(range(len(cuts) - 1)), cuts)


def memory_split(problem: Problem, tables: CostTables) -> list[tuple[int, int, int]]:
    n = tables.n
    order = sorted(range(len(tables.nodes)), key=lambda j: -tables.nodes[j].memory_bytes)[: tables.max_stages]
    mem = np.array([tables.nodes[j].memory_bytes for j in order], dtype=float)
    bounds = np.rint(np.cumsum(mem) / mem.sum() * n).astype(int).tolist()
    return _cuts_to_segments(order, [0, *bounds[:-1], n])


def petals_split(problem: Problem, tables: CostTables) -> list[tuple[int, int, int]]:
    n = tables.n
    order = sorted(range(len(tables.nodes)), key=lambda j: (-tables.nodes[j].compute_score, -tables.nodes[j].memory_gb))
    segs, s = [], 0
    for j in order[: tables.max_stages]:
        if s >= n:
            break
        fits = [e for e in range(s + 1, n + 1) if tables.memory[j, s, e] <= tables.nodes[j].memory_bytes]
        if fits:
            segs.append((j, s, max(fits)))
            s = max(fits)
    if s < n:  # the rule cannot cover the chain: report the first uncovered unit on the last tried node
        segs.append((order[min(len(order), tables.max_stages) - 1], s, n))
    return segs


BASELINES: dict[str, tuple[Callable[[Problem, CostTables], list[tuple[int, int, int]]], str]] = {
    "baseline-uniform": (uniform_split, "equal unit counts per node (PiPPy, vLLM)"),
    "baseline-params": (params_split, "parameter-balanced stages (DeepSpeed partition_method='parameters')"),
    "baseline-memory": (memory_split, "units proportional to node memory (exo, llama.cpp RPC)"),
    "baseline-petals": (petals_split, "greedy per node, fastest first, as many units as fit (Petals-style)"),
}


def _why_not(problem: Problem, tables: CostTables, segs: list[tuple[int, int, int]]) -> str | None:
    """None when every stage is allowed, else the first broken limit in words."""
    for j, s, e in segs:
        if np.isfinite(tables.compute[j, s, e]):
            continue
        node = tables.nodes[j]
        need = tables.memory[j, s, e]
        first, last = problem.units[s].name, problem.units[e - 1].name
        if need > node.memory_bytes:
            return (f"its stage {first}..{last} on {node.id} needs {need / GIB:.2f} GiB, "
                    f"the node has {node.memory_bytes / GIB:.2f} GiB")
        return f"its stage {first}..{last} on {node.id} breaks a pin"
    return None


class BaselineSolver(SolverBase):
    """One of :data:`BASELINES`; returns its rule's plan (status ``baseline``) or no plan and why."""

    exact = False
    optimises = False  # a fixed rule: under continuous batching it is placed once, not per stage count

    def __init__(self, name: str) -> None:
        self.name = name
        self.rule, self.description = BASELINES[name]

    def solve(
        self, problem: Problem, tables: CostTables, *, time_limit_s: float, hint: Plan | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> SolveResult:
        t0 = time.perf_counter()
        segs = self.rule(problem, tables)
        why = _why_not(problem, tables, segs)
        elapsed = time.perf_counter() - t0
        if why is not None:
            return SolveResult(self.name, "baseline", None, None, None, elapsed,
                               f"{self.description} cannot place this model: {why}")
        value = segments_value(tables, segs, problem.objective)
        return SolveResult(self.name, "baseline", plan_from_segments(tables, segs), value, None, elapsed,
                           self.description)
