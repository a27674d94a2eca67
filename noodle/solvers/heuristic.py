"""Heuristic: exact dynamic programme for a fixed node order, plus a search over orders.

For an order ``o_1, o_2, ...`` of distinct nodes, the pipeline uses a prefix
``o_1..o_S`` and cut points ``0 = c_0 < ... < c_S = n``. With ``C_j[s, e]`` a stage's
compute, ``H_jk[p]`` a hop and ``R_jk`` the token's return (see
:mod:`noodle.solvers.tables`):

* latency:    ``F_i[p] = min_q F_{i-1}[q] + H_{o_{i-1} o_i}[q] + C_{o_i}[q, p]``,
  value ``min_i F_i[n] + R_{o_i o_1}``;
* throughput: ``G_i[p] = min_q max(G_{i-1}[q], C_{o_i}[q, p] + H_{o_i o_{i+1}}[p])`` for
  ``p < n``, and ``C_{o_i}[q, n] + R_{o_i o_1}`` in the last stage.

Each DP layer is one vectorised ``min`` over an ``(n+1) x (n+1)`` array, so an order
costs O(S n^2) flops. The order search starts from the nodes sorted by speed (and
by memory), then applies first-improvement swaps and moves until no move helps or
the time budget is spent. Any plan is the DP optimum of some order, so with enough
search the heuristic reaches the optimum; it proves nothing.
"""

from __future__ import annotations

import time

import numpy as np

from noodle.solvers.base import SolveResult, plan_from_segments
from noodle.solvers.tables import INF, CostTables
from noodle.types import Plan, Problem

__all__ = ["HeuristicSolver", "dp_order", "search_orders"]


def dp_order(tables: CostTables, order: list[int], objective: str) -> tuple[float, list[tuple[int, int, int]]]:
    """Best plan whose stages use a prefix of ``order`` (node indices); (value, segments)."""
    n = tables.n
    first = order[0]
    best_val, best_end = INF, -1
    # f[i][p]: best value covering [0, p) with stage i on order[i] ending at p; arg[i][p]: its start q.
    f: list[np.ndarray] = []
    arg: list[np.ndarray] = []
    limit = min(len(order), tables.max_stages)
    for i in range(limit):
        j = order[i]
        c = tables.compute[j]  # [q, p]
        if i == 0:
            vals = c[0].copy()
            starts = np.zeros(n + 1, dtype=np.int64)
        else:
            prev = f[i - 1]
            hop_in = tables.hop[order[i - 1], j]  # indexed by q
            if objective == "latency":
                cand = (prev + hop_in)[:, None] + c
            else:
                nxt = order[i + 1] if i + 1 < limit else None
                out = tables.hop[j, nxt] if nxt is not None else np.zeros(n + 1)
                stage = c + out[None, :]
                stage[:, n] = c[:, n] + tables.ret[j, first]
                cand = np.maximum(prev[:, None], stage)
            starts = np.argmin(cand, axis=0)
            vals = cand[starts, np.arange(n + 1)]
        if i == 0 and objective != "latency":
            nxt = order[1] if limit > 1 else None
            out = tables.hop[j, nxt] if nxt is not None else np.zeros(n + 1)
            vals = vals + out
            vals[n] = c[0, n]  # a single stage returns nothing
        f.append(vals)
        arg.append(starts)
        total = vals[n] + (tables.ret[j, first] if (objective == "latency" and i > 0) else 0.0)
        if total < best_val - 1e-12:
            best_val, best_end = total, i
        if not np.isfinite(vals[: n]).any():
            break
    if best_end < 0:
        return INF, []
    segments: list[tuple[int, int, int]] = []
    p = n
    for i in range(best_end, -1, -1):
        q = int(arg[i][p]) if i > 0 else 0
        segments.append((order[i], q, p))
        p = q
    return best_val, segments[::-1]


def _start_orders(tables: CostTables, pinned: list[int]) -> list[list[int]]:
    """Speed-sorted and memory-sorted orders, pinned nodes first (they must be in the prefix)."""
    rest = [j for j in range(len(tables.nodes)) if j not in pinned]
    by_speed = pinned + sorted(rest, key=lambda j: (-tables.nodes[j].compute_score, -tables.nodes[j].memory_gb))
    by_mem = pinned + sorted(rest, key=lambda j: (-tables.nodes[j].memory_gb, -tables.nodes[j].compute_score))
    return [by_speed] if by_mem == by_speed else [by_speed, by_mem]


def search_orders(
    tables: CostTables,
    objective: str,
    *,
    time_limit_s: float,
    pinned: list[int] | None = None,
    seed_orders: list[list[int]] | None = None,
) -> tuple[float, list[tuple[int, int, int]]]:
    """First-improvement local search over node orders (swap and move)."""
    deadline = time.perf_counter() + time_limit_s
    seeds = seed_orders or _start_orders(tables, pinned or [])
    best_val, best_seg, best_order = INF, [], seeds[0]
    for order in seeds:
        val, seg = dp_order(tables, order, objective)
        if val < best_val:
            best_val, best_seg, best_order = val, seg, order
    m = len(best_order)
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for a in range(m):
            for b in range(m):
                if a == b or time.perf_counter() >= deadline:
                    continue
                if a < b:
                    cand = best_order.copy()
                    cand[a], cand[b] = cand[b], cand[a]
                    val, seg = dp_order(tables, cand, objective)
                    if val < best_val - 1e-9:
                        best_val, best_seg, best_order, improved = val, seg, cand, True
                cand = best_order.copy()
                cand.insert(b, cand.pop(a))
                val, seg = dp_order(tables, cand, objective)
                if val < best_val - 1e-9:
                    best_val, best_seg, best_order, improved = val, seg, cand, True
    return best_val, best_seg


class HeuristicSolver:
    """Fixed-order DP + local search over orders; fast, no solver dependency, no proof."""

    name = "heuristic"

    def solve(
        self, problem: Problem, tables: CostTables, *, time_limit_s: float, hint: Plan | None = None
    ) -> SolveResult:
        t0 = time.perf_counter()
        budget = min(time_limit_s, 0.5 + 0.02 * len(tables.nodes) ** 2)
        pos = {nd.id: j for j, nd in enumerate(tables.nodes)}
        pinned = list(dict.fromkeys(pos[p.node] for p in sorted(problem.constraints.pins, key=lambda p: p.start)))
        val, seg = search_orders(tables, problem.objective, time_limit_s=budget, pinned=pinned)
        elapsed = time.perf_counter() - t0
        if not seg:
            return SolveResult(self.name, "heuristic", None, None, None, elapsed, "the heuristic found no plan")
        return SolveResult(self.name, "heuristic", plan_from_segments(tables, seg), val, None, elapsed)

