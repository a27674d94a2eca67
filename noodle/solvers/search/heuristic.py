"""Heuristic: the exact dynamic programme for a fixed node order (:mod:`.orderdp`), plus a search over orders.

Any plan is the DP optimum of some order (:func:`~noodle.solvers.search.orderdp.dp_order`), so the
search is over orders. It starts from nodes sorted by speed, by memory, and grouped by
cheap links (sites; :mod:`.orders`); it applies first-improvement swaps and moves until no move
helps (a local optimum), each neighbourhood priced at once by
:func:`~noodle.solvers.search.orderdp.dp_values`, then perturbs the best order (iterated local
search, seeded, so runs are reproducible) until ``patience`` perturbations in a row bring nothing or
the time budget is spent. The search can reach the optimum; it proves nothing (small instances are
then proven by the exact set DP). A ``KeyboardInterrupt`` ends the search early with the best plan so far.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from noodle.solvers.base import SolveResult, SolverBase, plan_from_segments
from noodle.solvers.exact.fallback import exact_fallback
from noodle.solvers.exact.subsetdp import Interrupted, dp_seconds, solve_subset_dp
from noodle.solvers.search.orderdp import dp_order, dp_values
from noodle.solvers.search.orders import picks_order, start_orders  # picks_order: re-exported
from noodle.solvers.tables import INF, CostTables
from noodle.types import Plan, Problem

__all__ = ["HeuristicSolver", "SearchResult", "dp_order", "dp_values", "search_orders", "start_orders", "default_budget",
           "picks_order"]


class SearchResult(NamedTuple):
    """Best value and segments found; ``interrupted`` when a KeyboardInterrupt ended the search."""

    value: float
    segments: list[tuple[int, int, int]]
    interrupted: bool = False


@dataclass
class _Best:
    """The best plan the search has recorded so far (mutated by its ``record`` callback)."""

    val: float
    seg: list[tuple[int, int, int]]
    order: list[int]


DP_MAX_NODES = 16  # above this the set DP is out of reach anyway (grouping nodes into classes costs ~0.6 s at 128)
DP_BUDGET_FACTOR = 2.0  # run the exact set DP when its (pessimistic) estimate is within this x the search budget


def default_budget(m: int, n: int) -> float:
    """Seconds the heuristic searches by default: 40 ms up to ~8 nodes x 50 units, growing as m^3 n^2."""
    return float(min(5.0, max(0.04, 4e-9 * m**3 * (n + 1) ** 2)))


def _neighbours(order: list[int], used: int, frozen: int) -> np.ndarray:
    """Orders one swap or one move away, skipping changes confined to the unused tail."""
    m = len(order)
    out: list[np.ndarray] = []
    base = np.array(order)
    for a in range(frozen, m):
        for b in range(frozen, m):
            if a == b or (a >= used and b >= used):
                continue
            if a < b:
                cand = base.copy()
                cand[a], cand[b] = cand[b], cand[a]
                out.append(cand)
            if abs(a - b) > 1 or a < b:  # adjacent moves equal swaps
                moved = list(order)
                moved.insert(b, moved.pop(a))
                out.append(np.array(moved))
    return np.array(out, dtype=np.int64).reshape(-1, m)


def _local_search(
    tables: CostTables,
    objective: str,
    order: list[int],
    val: float,
    seg: list[tuple[int, int, int]],
    deadline: float,
    frozen: int,
    rng: random.Random,
    record: Callable[[float, list[tuple[int, int, int]], list[int]], None] | None = None,
) -> tuple[float, list[tuple[int, int, int]], list[int]]:
    """Swaps and moves until none helps: the neighbourhood is scanned in shuffled chunks, numpy-vectorised,
    and the best improvement of the first improving chunk is taken (whole-neighbourhood best improvement
    when it fits in one chunk)."""
    n = tables.n
    chunk = max(32, int(3e6 // ((n + 1) ** 2 * max(1, min(len(order), tables.max_stages)))))
    while time.perf_counter() < deadline:
        cands = _neighbours(order, len(seg), frozen)
        if len(cands) == 0:
            break
        if len(cands) > chunk:
            cands = cands[rng.sample(range(len(cands)), len(cands))]
        moved = False
        for lo in range(0, len(cands), chunk):
            if time.perf_counter() >= deadline:
                return val, seg, order
            part = cands[lo : lo + chunk]
            vals = dp_values(tables, part, objective, cutoff=val, deadline=deadline)
            k = int(np.argmin(vals))
            if vals[k] < val - 1e-9 * max(1.0, abs(val)):
                v, s = dp_order(tables, part[k].tolist(), objective)
                if s and v < val:
                    val, seg, order, moved = v, s, part[k].tolist(), True
                    if record is not None:
                        record(val, seg, order)
                    break
        if not moved:
            break
    return val, seg, order


def search_orders(
    tables: CostTables,
    objective: str,
    *,
    time_limit_s: float,
    pinned: list[int] | None = None,
    seed_orders: list[list[int]] | None = None,
    patience: int | None = None,
    ls_seeds: int = 1,
    seed: int = 0,
    target: float = -INF,
) -> SearchResult:
    """Local search over node orders from several seeds, then iterated local search.

    ``patience`` perturbations in a row without improvement end the search (default: grows
    with the number of nodes); so do the time limit, a KeyboardInterrupt, and reaching
    ``target`` (a known lower bound).
    """
    deadline = time.perf_counter() + time_limit_s
    pinned = pinned or []
    frozen = 0  # pinned nodes move too: the DP refuses orders that break a pin (INF)
    seeds = seed_orders or start_orders(tables, pinned, many=True)
    m = len(seeds[0])
    patience = patience if patience is not None else 2 + m // 2
    best = _Best(INF, [], seeds[0])

    def record(val: float, seg: list[tuple[int, int, int]], order: list[int]) -> None:
        if seg and val < best.val - 1e-9 * max(1.0, abs(best.val) if np.isfinite(best.val) else 1.0):
            best.val, best.seg, best.order = val, seg, order

    rng = random.Random(seed)
    interrupted = False
    try:
        vals = dp_values(tables, np.array(seeds), objective, deadline=deadline)
        if not np.isfinite(vals).any():  # out of time before any seed finished: the first one, whole
            vals[0] = dp_order(tables, seeds[0], objective)[0]
        starts = []
        for k in np.argsort(vals, kind="stable")[:ls_seeds]:
            if np.isfinite(vals[k]):
                v, s = dp_order(tables, seeds[k], objective)
                starts.append((v, s, seeds[k]))
                record(v, s, seeds[k])
        for val, seg, order in starts:
            record(*_local_search(tables, objective, order, val, seg, deadline, frozen, rng, record))
        stale = 0
        reached = lambda: best.val <= target * (1 + 2e-6) + 1e-12  # noqa: E731  (bounds come within 1e-6)
        while best.seg and stale < patience and time.perf_counter() < deadline and m >= 3 and not reached():
            before = best.val
            cand = _perturb(best.order, len(best.seg), frozen, rng)
            val, seg = dp_order(tables, cand, objective)
            if seg:
                record(*_local_search(tables, objective, cand, val, seg, deadline, frozen, rng, record))
            stale = 0 if best.val < before else stale + 1
    except KeyboardInterrupt:
        interrupted = True
    return SearchResult(best.val, best.seg, interrupted)


def _perturb(order: list[int], used: int, frozen: int, rng: random.Random) -> list[int]:
    """A random kick: reverse a run of the used nodes and swap a used node with an unused one."""
    cand = order.copy()
    m = len(cand)
    hi = max(frozen + 2, min(m, used + 1))
    a, b = sorted(rng.sample(range(frozen, hi), 2))
    cand[a : b + 1] = cand[a : b + 1][::-1]
    if used < m:
        x = rng.randrange(frozen, used)
        y = rng.randrange(used, m)
        cand[x], cand[y] = cand[y], cand[x]
    else:
        x, y = rng.sample(range(frozen, m), 2)
        cand[x], cand[y] = cand[y], cand[x]
    return cand


class HeuristicSolver(SolverBase):
    """Fixed-order DP + local search over orders; fast, no solver dependency.

    Searches for ``min(time_limit_s, default_budget(m, n))`` seconds at most, fewer when the
    iterated local search stops improving; ``hint`` (a plan) seeds the search. When the
    exact set DP (:mod:`noodle.solvers.exact.subsetdp`) is estimated to take at most
    ``DP_BUDGET_FACTOR`` times that budget (small instances: ~6 nodes x 14 units), it
    runs after the search with the search's value as cutoff, within ``time_limit_s``, so the
    plan is then proven optimal whatever the machine's load (the estimate counts work, not time). When the search finds no plan, the set DP (if it fits in the time
    limit) or an installed exact model proves that none exists (status ``infeasible``).
    """

    name = "heuristic"
    options = {"seed": int}  # the iterated local search's random seed (default 0)

    def __init__(self, *, prove: bool = True) -> None:
        self.prove = prove  # False: a warm start; finding no plan is then not worth a proof

    def solve(
        self, problem: Problem, tables: CostTables, *, time_limit_s: float, hint: Plan | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> SolveResult:
        t0 = time.perf_counter()
        obj = problem.objective
        pos = {nd.id: j for j, nd in enumerate(tables.nodes)}
        pinned = list(dict.fromkeys(pos[p.node] for p in sorted(problem.constraints.pins, key=lambda p: p.start)))
        seeds = start_orders(tables, pinned, many=True)
        if hint is not None:
            used = [pos[s.node] for s in hint.stages if s.node in pos]
            seeds = [used + [j for j in range(len(tables.nodes)) if j not in used]] + seeds
        budget = min(time_limit_s, default_budget(len(tables.nodes), tables.n))
        res = search_orders(tables, obj, time_limit_s=budget, pinned=pinned, seed_orders=seeds,
                            seed=(options or {}).get("seed", 0))
        val, seg = res.value, res.segments
        if res.interrupted:
            return self._result(tables, val, seg, t0, "interrupted (Ctrl-C): best plan so far", interrupted=True)
        deadline = t0 + time_limit_s
        left = deadline - time.perf_counter()
        est = dp_seconds(tables, obj) if len(tables.nodes) <= DP_MAX_NODES else INF
        small = est <= DP_BUDGET_FACTOR * budget and est <= 0.5 * time_limit_s
        if (small and seg) or (self.prove and not seg and est <= 0.8 * left):
            try:
                cutoff = val * (1 + 1e-9) + 1e-12 if seg else INF
                # chosen by its work estimate, the DP then has the caller's whole limit: a busy machine
                # makes it slower, not unproven
                v, s = solve_subset_dp(tables, obj, deadline=deadline, cutoff=cutoff)
            except Interrupted:
                pass
            except KeyboardInterrupt:
                return self._result(tables, val, seg, t0, "interrupted (Ctrl-C): best plan so far", interrupted=True)
            else:
                if s and v < val:
                    val, seg = v, s
                if not seg:  # the exact DP found no plan at all: none exists (solve() words why)
                    return SolveResult(self.name, "infeasible", None, None, None, time.perf_counter() - t0)
                return self._result(tables, val, seg, t0, "proven optimal: exact set DP (small instance)",
                                    status="optimal")
        if self.prove and not seg and time.perf_counter() < deadline - 0.05:
            exact = exact_fallback(problem, tables, deadline - time.perf_counter())
            if exact is not None and exact.status == "infeasible":
                return replace(exact, solver=f"{self.name}/{exact.solver}", solve_time_s=time.perf_counter() - t0)
            if exact is not None and exact.plan is not None:
                return replace(exact, solver=f"{self.name}/{exact.solver}", solve_time_s=time.perf_counter() - t0)
        return self._result(tables, val, seg, t0, "")

    def _result(self, tables: CostTables, val: float, seg: list[tuple[int, int, int]], t0: float, note: str, *,
                status: str = "heuristic", interrupted: bool = False) -> SolveResult:
        elapsed = time.perf_counter() - t0
        if not seg:
            why = "interrupted before any plan was found" if interrupted else "the heuristic found no plan"
            return SolveResult(self.name, "heuristic", None, None, None, elapsed, why, interrupted=interrupted)
        plan = plan_from_segments(tables, seg)
        bound = val if status == "optimal" else None
        return SolveResult(self.name, status, plan, val, bound, elapsed, note, interrupted=interrupted)
