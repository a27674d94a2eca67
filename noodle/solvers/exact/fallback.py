"""The exact model that settles a question the search could not: is there a plan at all?"""

from __future__ import annotations

from noodle.solvers.base import SolveResult
from noodle.solvers.exact.cpsat import CpSatSolver
from noodle.solvers.exact.milp import MilpSolver
from noodle.solvers.tables import CostTables
from noodle.types import Problem

__all__ = ["exact_fallback"]


def exact_fallback(problem: Problem, tables: CostTables, seconds: float) -> SolveResult | None:
    """The first installed exact model (HiGHS, else CP-SAT), without a start plan: finds a plan or proves none.

    None when neither is installed.
    """
    for impl in (MilpSolver(backend="highs"), CpSatSolver()):
        if impl.is_installed():
            return impl.solve(problem, tables, time_limit_s=max(0.1, seconds))
    return None
