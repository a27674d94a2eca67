"""The Solver protocol, its result type, and the solver registry.

Statuses: ``optimal`` (proven), ``feasible`` (a plan with a bound and gap, not
proven), ``infeasible`` (proven: no plan exists), ``heuristic`` (a plan with no
proof), ``baseline`` (a plan from a reference strategy, for comparison).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Protocol

from noodle.registry import Registry
from noodle.solvers.tables import CostTables
from noodle.types import Plan, Problem

__all__ = ["STATUSES", "SolveResult", "Solver", "SOLVERS", "plan_from_segments", "relative_gap", "exact_fallback"]

STATUSES = ("optimal", "feasible", "infeasible", "heuristic", "baseline")


@dataclass(frozen=True)
class SolveResult:
    """What a solver returns; ``objective_ms`` is the plan re-evaluated under the cost model."""

    solver: str
    status: str
    plan: Plan | None
    objective_ms: float | None
    bound_ms: float | None
    solve_time_s: float
    note: str = ""
    interrupted: bool = False  # Ctrl-C ended the search early; the plan is the best found so far

    @property
    def gap(self) -> float | None:
        if self.objective_ms is None or self.bound_ms is None:
            return None
        return relative_gap(self.objective_ms, self.bound_ms)


def relative_gap(objective: float, bound: float) -> float:
    """``(objective - bound) / objective``, clipped at 0."""
    if objective <= 0:
        return 0.0
    return max(0.0, (objective - bound) / objective)


class Solver(Protocol):
    """A placement solver. ``solve`` never mutates its inputs."""

    name: str

    def solve(
        self, problem: Problem, tables: CostTables, *, time_limit_s: float, hint: Plan | None = None
    ) -> SolveResult:
        """Solve ``problem`` whose costs are ``tables``; ``hint`` is a feasible plan to warm-start from."""
        ...


SOLVERS: Registry[Solver] = Registry("solver")


def plan_from_segments(tables: CostTables, segments: list[tuple[int, int, int]]) -> Plan:
    """Plan from chosen (node index, start, end) segments, ordered along the chain."""
    ordered = sorted(segments, key=lambda t: t[1])
    return Plan.from_cuts([tables.nodes[j].id for j, _, _ in ordered], [0, *(e for _, _, e in ordered)])


def exact_fallback(problem: Problem, tables: CostTables, seconds: float) -> SolveResult | None:
    """The first installed exact model (HiGHS, else CP-SAT), without a start plan: finds a plan or proves none.

    None when neither is installed (or registered).
    """
    for name, module in (("milp", "highspy"), ("cpsat", "ortools")):
        if name in SOLVERS and importlib.util.find_spec(module) is not None:
            return SOLVERS.get(name).solve(problem, tables, time_limit_s=max(0.1, seconds))
    return None
