"""Placement solvers, registered in preference order (see :mod:`noodle.registry`)."""

from functools import partial

from noodle.solvers.auto import AutoSolver
from noodle.solvers.base import SOLVERS, SolveResult, Solver
from noodle.solvers.baselines import BASELINES, BaselineSolver
from noodle.solvers.cpsat import CpSatSolver
from noodle.solvers.heuristic import HeuristicSolver
from noodle.solvers.milp import MilpSolver
from noodle.solvers.run import solve

__all__ = [
    "SOLVERS", "SolveResult", "Solver", "solve", "AutoSolver", "CpSatSolver", "MilpSolver", "HeuristicSolver",
    "BaselineSolver", "BASELINES",
]

SOLVERS.register("auto", AutoSolver)
SOLVERS.register("cpsat", CpSatSolver)
SOLVERS.register("milp", MilpSolver)
SOLVERS.register("heuristic", HeuristicSolver)
# Baselines come after the real solvers: ``auto``'s preference order is unchanged.
for _name in BASELINES:
    SOLVERS.register(_name, partial(BaselineSolver, _name))
