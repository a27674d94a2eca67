"""Placement solvers, registered in preference order (see :mod:`noodle.registry`).

``tables`` (what every solver reads), ``search/`` (the heuristic), ``bounds/`` (lower bounds),
``exact/`` (segment model, MILP, CP-SAT, set DP), ``auto`` (all of them in turn), ``baselines``,
``run`` (:func:`solve`, the entry point), ``base`` (the protocol, results, options and registry).
"""

from functools import partial

from noodle.solvers.auto import AutoSolver
from noodle.solvers.base import SOLVERS, SolveResult, Solver, check_options
from noodle.solvers.baselines import BASELINES, BaselineSolver
from noodle.solvers.exact.cpsat import CpSatSolver
from noodle.solvers.exact.milp import MilpSolver
from noodle.solvers.run import solve
from noodle.solvers.search.heuristic import HeuristicSolver

__all__ = [
    "SOLVERS", "SolveResult", "Solver", "solve", "check_options", "AutoSolver", "CpSatSolver", "MilpSolver",
    "HeuristicSolver", "BaselineSolver", "BASELINES",
]

SOLVERS.register("auto", AutoSolver)
SOLVERS.register("cpsat", CpSatSolver)
SOLVERS.register("milp", MilpSolver)
SOLVERS.register("heuristic", HeuristicSolver)
# Baselines come after the real solvers: ``auto``'s preference order is unchanged.
for _name in BASELINES:
    SOLVERS.register(_name, partial(BaselineSolver, _name))
