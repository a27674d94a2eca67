"""``auto``: heuristic, lower bound, exact DP when affordable, then more search; always the best plan so far.

1. The heuristic (:mod:`noodle.solvers.search.heuristic`) gives a plan within a short budget.
2. The typed-knapsack bound (:mod:`noodle.solvers.bounds`) gives a lower bound. When it
   meets the plan's value (relative gap <= ``PROOF_GAP``) the plan is proven optimal:
   this happens on most real-architecture instances, at any size.
3. A short iterated local search toward the bound, seeded with the relaxation's own
   solution, often closes the gap (then it is a proof again).
4. Otherwise, when the exact set DP (:mod:`noodle.solvers.exact.subsetdp`) fits in the time
   left (few nodes, or many interchangeable ones), it settles the question exactly
   (including "no plan exists").
5. Otherwise the iterated local search continues with the time left (on 16-64 nodes it
   finds better plans than CP-SAT or HiGHS do in the same time, see docs/solvers.md), and
   the result is ``feasible`` with the bound and its gap.
6. If no plan was found at all and the DP is out of reach, the first installed exact
   model (HiGHS, else CP-SAT) gets the time left, to find one or prove there is none.

Ctrl-C (KeyboardInterrupt) or the time limit at any point returns the best plan so far,
with ``interrupted`` set when it was Ctrl-C. The note says which step decided.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from noodle.solvers.base import SolveResult, SolverBase, plan_from_segments, relative_gap
from noodle.solvers.bounds import objective_bound, relaxed_picks
from noodle.solvers.exact.fallback import exact_fallback
from noodle.solvers.exact.limits import bound_cost_seconds
from noodle.solvers.exact.subsetdp import Interrupted, dp_seconds, node_classes, solve_subset_dp
from noodle.solvers.search.heuristic import HeuristicSolver, default_budget, picks_order, search_orders, start_orders
from noodle.solvers.tables import INF, CostTables, plan_segments
from noodle.types import Plan, Problem

__all__ = ["AutoSolver", "PROOF_GAP"]

PROOF_GAP = 1e-8  # relative gap below which a plan is reported optimal (floating-point noise)


def lower_bound(
    tables: CostTables, objective: str, upper: float, time_limit_s: float, rel_tol: float = 1e-9
) -> float:
    """The typed-knapsack bound for ``objective`` (see :mod:`noodle.solvers.bounds`).

    For throughput the bisection stops within ``rel_tol``; a proof still checks ``upper`` exactly.
    """
    return objective_bound(tables, objective, upper=upper, time_limit_s=time_limit_s, rel_tol=rel_tol)


class AutoSolver(SolverBase):
    name = "auto"

    def solve(
        self, problem: Problem, tables: CostTables, *, time_limit_s: float, hint: Plan | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> SolveResult:
        t0 = time.perf_counter()
        deadline = t0 + time_limit_s
        obj = problem.objective
        m, n = len(tables.nodes), tables.n
        val, how, stopped = INF, "heuristic", False
        seg: list[tuple[int, int, int]] = []
        bound: float | None = None
        pinned = _pinned(problem, tables)

        def search(seconds: float, patience: int) -> None:
            """More iterated local search from the incumbent, until the bound is met (then it is a proof)."""
            nonlocal val, seg, bound, how, stopped
            order = [j for j, _, _ in seg]
            order += [j for j in range(m) if j not in order]
            seeds = [order]
            if bound is not None:  # the relaxation's own solution, ordered site by site
                tau = bound * (1 + 1e-6) + 1e-12 if obj != "latency" else INF
                picks = relaxed_picks(tables, obj, tau=tau)
                if picks:
                    seeds.append(picks_order(tables, picks))
            res = search_orders(tables, obj, time_limit_s=seconds, pinned=pinned, patience=patience, seed=1,
                                seed_orders=[*seeds, *start_orders(tables, pinned)],
                                target=bound if bound is not None else -INF)
            stopped = res.interrupted
            if res.segments and res.value < val:
                val, seg = res.value, res.segments
            if not stopped and bound is not None and relative_gap(val, bound) <= 1e-6 \
                    and bound_cost_seconds(tables) <= deadline - time.perf_counter():
                bound = max(bound, lower_bound(tables, obj, val, time_limit_s=0.5))  # exact check at val
            if bound is not None and relative_gap(val, bound) <= PROOF_GAP:
                how = "bound"

        try:
            budget = min(0.3 * time_limit_s, default_budget(m, n))
            heur = HeuristicSolver(prove=False).solve(problem, tables, time_limit_s=budget, hint=hint)
            stopped = heur.interrupted
            if heur.plan is not None and heur.objective_ms is not None:  # a plan always comes with its value
                val, seg = heur.objective_ms, plan_segments(tables, heur.plan)
                if heur.status == "optimal":  # the heuristic ran the exact set DP (small instance)
                    bound, how = val, "dp"
            left = deadline - time.perf_counter()
            if not stopped and seg and how == "heuristic" and bound_cost_seconds(tables) <= max(0.05, min(2.0, 0.2 * left)):
                bound = lower_bound(tables, obj, val, time_limit_s=max(0.05, min(2.0, 0.2 * left)), rel_tol=1e-6)
                if relative_gap(val, bound) <= PROOF_GAP:
                    how = "bound"
            if not stopped and seg and how == "heuristic":  # a short search toward the bound often closes it
                search(min(0.1 * (deadline - time.perf_counter()), 4 * default_budget(m, n)), patience=2 + m)
            if not stopped and how == "heuristic" and m <= 64:
                classes = node_classes(tables)
                left = deadline - time.perf_counter()
                if dp_seconds(tables, obj, classes) <= 0.8 * left:
                    try:
                        cutoff = val * (1 + 1e-9) + 1e-12 if seg else INF
                        v, s = solve_subset_dp(tables, obj, classes=classes, deadline=deadline, cutoff=cutoff)
                        if s and v < val:
                            val, seg = v, s
                        if seg:
                            bound, how = val, "dp"
                        else:  # the exact DP found no plan at all: none exists
                            elapsed = time.perf_counter() - t0
                            # (no note: solve() words the reason with explain_infeasible)
                            return SolveResult("auto/dp", "infeasible", None, None, None, elapsed)
                    except Interrupted:
                        pass
            if not stopped and how == "heuristic" and seg and time.perf_counter() < deadline - 0.05:
                search(deadline - time.perf_counter(), patience=10**9)
            if not stopped and not seg and how == "heuristic" and time.perf_counter() < deadline - 0.05:
                # no plan and no affordable DP: let an exact model find one or prove there is none
                exact = exact_fallback(problem, tables, deadline - time.perf_counter())
                if exact is not None:
                    if exact.status == "infeasible" or exact.plan is not None:
                        return replace(exact, solver=f"auto/{exact.solver}", solve_time_s=time.perf_counter() - t0)
        except KeyboardInterrupt:
            stopped = True
        elapsed = time.perf_counter() - t0
        if not seg:
            note = "interrupted before any plan was found" if stopped else f"no plan found within {time_limit_s:g} s"
            return SolveResult("auto", "unknown", None, None, None, elapsed, note, interrupted=stopped)
        plan = plan_from_segments(tables, seg)
        if how in ("bound", "dp"):
            why = ("the heuristic's plan meets the typed-knapsack lower bound" if how == "bound"
                   else f"exact set DP over {len(node_classes(tables))} node classes")
            return SolveResult(f"auto/{how}", "optimal", plan, val, val, elapsed, f"proven optimal: {why}")
        gap = "unknown" if bound is None else f"{relative_gap(val, bound):.2%}"
        note = (f"interrupted (Ctrl-C) after {elapsed:.2f} s: best plan so far, gap {gap}" if stopped
                else f"time limit {time_limit_s:g} s: best plan found by local search, gap to the bound {gap}")
        return SolveResult("auto/heuristic", "feasible" if bound is not None else "heuristic", plan, val,
                           bound, elapsed, note, interrupted=stopped)


def _pinned(problem: Problem, tables: CostTables) -> list[int]:
    pos = {nd.id: j for j, nd in enumerate(tables.nodes)}
    return list(dict.fromkeys(pos[p.node] for p in sorted(problem.constraints.pins, key=lambda p: p.start)))
