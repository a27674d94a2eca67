"""``solve``: the one entry point that runs a registered solver on a problem.

It builds the cost tables once, proves easy infeasibility up front, warm-starts exact
solvers from the heuristic's plan (and never returns worse than it), spends time an exact
solver leaves unused on local search, and re-evaluates the plan under the cost model.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from noodle.errors import InfeasibleError, NoodleError
from noodle.graph.costmodel import CostModel, cost_model_for, evaluate
from noodle.solvers.base import SOLVERS, SolveResult, Solver, check_options
from noodle.solvers.batched import solve_batched
from noodle.solvers.search.heuristic import HeuristicSolver, default_budget
from noodle.solvers.tables import CostTables, build_tables, check_feasible, explain_infeasible, plan_segments, segments_value
from noodle.types import Problem

__all__ = ["solve", "WARM_START_SHARE"]

WARM_START_SHARE = 0.5  # at most this share of the time limit goes to the heuristic's warm start


def solve(
    problem: Problem,
    *,
    solver: str = "auto",
    time_limit_s: float = 10.0,
    cost_model: CostModel | None = None,
    options: Mapping[str, Any] | None = None,
) -> SolveResult:
    """Place ``problem``'s units on its nodes.

    Args:
        problem: units, cluster, workload, objective and constraints.
        solver: a registered solver name (``auto``, ``cpsat``, ``milp``, ``heuristic``, baselines).
        time_limit_s: wall-clock budget for the search.
        cost_model: the cost model; default :func:`~noodle.graph.cost_model_for` the problem (per-node when
            some node carries its own profile, else :class:`~noodle.graph.DefaultCostModel`).
        options: options of ``solver`` (its ``options`` attribute lists them, e.g. ``milp``'s ``backend``),
            passed through to it.

    Returns:
        A :class:`SolveResult` whose ``objective_ms`` re-evaluates the plan under ``cost_model``.

    Ctrl-C (KeyboardInterrupt) during the search returns the best plan found so far with
    ``interrupted=True`` and a note; it propagates only when no plan exists yet.

    Raises:
        InfeasibleError: no plan satisfies memory, pins and stage cap (the message names why).
        SolverUnavailable: unknown solver name or missing optional dependency.
        SpecError: an option ``solver`` does not take, or a value of the wrong type.
        KeyboardInterrupt: Ctrl-C before any plan was found.
    """
    cm = cost_model or cost_model_for(problem)
    impl = SOLVERS.get(solver)
    opts = check_options(impl, options)
    start = time.perf_counter()
    if problem.workload.batched and getattr(impl, "optimises", True):
        result, tables = solve_batched(
            problem, cm, lambda part, t, secs: _solve_tables(part, impl, t, secs, opts), time_limit_s)
    else:  # (a baseline places by its rule; evaluate() prices its plan, batched or not)
        tables = build_tables(replace(problem, workload=problem.workload.at_stages(1)), cm)
        check_feasible(problem, tables)
        result = _solve_tables(problem, impl, tables, time_limit_s, opts)
    if result.status == "infeasible":
        raise InfeasibleError(result.note or explain_infeasible(problem, tables))
    if result.plan is None:
        if result.interrupted:
            raise KeyboardInterrupt
        hint_txt = "" if result.status == "baseline" else " (raise the time limit?)"
        raise NoodleError(f"solver {result.solver!r}: {result.note or 'no plan found'}{hint_txt}")
    ev = evaluate(problem, result.plan, cm)
    return replace(result, objective_ms=ev.objective_ms, solve_time_s=time.perf_counter() - start)


def _solve_tables(problem: Problem, impl: Solver, tables: CostTables, time_limit_s: float,
                  opts: dict[str, Any]) -> SolveResult:
    """One solver on one set of tables: the heuristic's warm start for an exact one, never worse than it,
    then local search for the time it left unused."""
    start = time.perf_counter()
    hint_result = None
    if getattr(impl, "exact", False):
        warm = min(default_budget(len(tables.nodes), tables.n), WARM_START_SHARE * time_limit_s)
        hint_result = HeuristicSolver(prove=False).solve(problem, tables, time_limit_s=warm)
    hint = hint_result.plan if hint_result is not None else None
    if hint_result is not None and hint_result.interrupted:
        result = replace(hint_result, solver=f"{impl.name}/heuristic")
    else:
        remaining = max(0.05, time_limit_s - (time.perf_counter() - start))
        try:
            result = impl.solve(problem, tables, time_limit_s=remaining, hint=hint, options=opts)
        except KeyboardInterrupt:
            if hint_result is None or hint_result.plan is None:
                raise
            result = replace(hint_result, solver=f"{impl.name}/heuristic", interrupted=True,
                             note="interrupted (Ctrl-C): the heuristic's start plan")
        result = _not_worse(tables, problem.objective, result, hint_result, impl.name)
        left = 0.9 * (time_limit_s - (time.perf_counter() - start)) - 0.05
        if hint_result is not None and result.plan is not None and result.status != "optimal" \
                and not result.interrupted and left > 0.1:
            result = _polish(problem, tables, result, left, impl.name)
    return result


def _polish(problem: Problem, tables: CostTables, result: SolveResult, seconds: float, name: str) -> SolveResult:
    """Local search from an exact solver's unproven plan for the time it left unused (never worse)."""
    try:
        more = HeuristicSolver(prove=False).solve(problem, tables, time_limit_s=seconds, hint=result.plan)
    except KeyboardInterrupt:
        return replace(result, interrupted=True)
    if more.plan is None or more.objective_ms is None or result.objective_ms is None \
            or more.objective_ms >= result.objective_ms * (1 - 1e-9):
        return replace(result, interrupted=result.interrupted or more.interrupted)
    bound = None if result.bound_ms is None else min(result.bound_ms, more.objective_ms)
    return replace(more, solver=f"{name}/heuristic", status="feasible" if bound is not None else "heuristic",
                   bound_ms=bound, note=f"{result.note or name}; then local search for the time left")


def _not_worse(tables: CostTables, objective: str, result: SolveResult, warm: SolveResult | None,
               name: str) -> SolveResult:
    """An exact solver's result, or its warm start when that is better (a model solver may stop on a worse plan).

    Both plans are compared on the tables (an exact solver's own value may be rounded, e.g. CP-SAT's ns).
    """
    if warm is None or warm.plan is None:
        return result
    warm_val = segments_value(tables, plan_segments(tables, warm.plan), objective)
    if result.plan is not None:
        val = segments_value(tables, plan_segments(tables, result.plan), objective)
        if val <= warm_val * (1 + 1e-9) + 1e-12:
            return result
    if result.status == "optimal":  # proven within rounding, and the warm start is no worse: optimal too
        return replace(warm, solver=f"{name}/heuristic", status="optimal", bound_ms=warm_val, objective_ms=warm_val,
                       note=f"proven optimal by {name} (the warm start is as good)")
    bound = None if result.status == "infeasible" else result.bound_ms
    why = result.note or f"{name} found nothing better"
    return replace(warm, solver=f"{name}/heuristic", status="feasible" if bound is not None else "heuristic",
                   bound_ms=None if bound is None else min(bound, warm_val), interrupted=result.interrupted,
                   objective_ms=warm_val, note=f"{why}; kept the warm start (the heuristic's plan)")
