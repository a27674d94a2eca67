"""``auto``: the heuristic first (a start and a fallback), then the first available exact solver.

The exact solver gets the rest of the time limit and the heuristic's plan as a
warm start. If it proves optimality or infeasibility, that is the answer; if it
stops on the time limit, the better of its incumbent and the heuristic's plan is
returned with the exact solver's bound; if no exact solver is installed or it
finds nothing, the heuristic's plan is returned. The result's note says which ran.
"""

from __future__ import annotations

import importlib.util
import time

from noodle.solvers.base import SOLVERS, SolveResult
from noodle.solvers.heuristic import HeuristicSolver
from noodle.solvers.tables import CostTables
from noodle.types import Plan, Problem

__all__ = ["AutoSolver", "EXACT_PREFERENCE"]

# (solver name, module that must be importable)
EXACT_PREFERENCE = (("cpsat", "ortools"), ("milp", "pulp"))


class AutoSolver:
    name = "auto"

    def solve(
        self, problem: Problem, tables: CostTables, *, time_limit_s: float, hint: Plan | None = None
    ) -> SolveResult:
        t0 = time.perf_counter()
        heur = HeuristicSolver().solve(problem, tables, time_limit_s=min(1.0, 0.25 * time_limit_s))
        exact_name = next((name for name, mod in EXACT_PREFERENCE if importlib.util.find_spec(mod)), None)
        if exact_name is None:
            return _as_auto(heur, "no exact solver installed (pip install ortools or pulp); heuristic plan")
        remaining = time_limit_s - (time.perf_counter() - t0)
        exact = SOLVERS.get(exact_name).solve(problem, tables, time_limit_s=max(0.1, remaining), hint=heur.plan)
        elapsed = time.perf_counter() - t0
        h_txt = f"heuristic start {heur.objective_ms:.4g} ms" if heur.plan else "heuristic found no start"
        if exact.status == "optimal":
            note = f"{exact.solver} proved optimality in {exact.solve_time_s:.2f} s ({h_txt})"
            return SolveResult(f"auto/{exact.solver}", "optimal", exact.plan, exact.objective_ms, exact.bound_ms, elapsed, note)
        if exact.status == "infeasible":
            return SolveResult(f"auto/{exact.solver}", "infeasible", None, None, None, elapsed, exact.note)
        if exact.plan is not None and (heur.plan is None or exact.objective_ms <= heur.objective_ms):
            note = f"{exact.solver} stopped at the time limit without a proof ({h_txt})"
            return SolveResult(f"auto/{exact.solver}", "feasible", exact.plan, exact.objective_ms, exact.bound_ms, elapsed, note)
        if heur.plan is not None:
            why = f"{exact.solver} found nothing better within {time_limit_s:g} s; heuristic plan"
            if exact.bound_ms is not None:
                return SolveResult("auto/heuristic", "feasible", heur.plan, heur.objective_ms, exact.bound_ms, elapsed, why)
            return _as_auto(heur, why, elapsed)
        return SolveResult("auto", "unknown", None, None, None, elapsed, f"no plan found within {time_limit_s:g} s")


def _as_auto(res: SolveResult, note: str, elapsed: float | None = None) -> SolveResult:
    return SolveResult(
        "auto/heuristic", res.status, res.plan, res.objective_ms, None,
        res.solve_time_s if elapsed is None else elapsed, note,
    )

