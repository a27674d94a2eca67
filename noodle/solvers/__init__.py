"""Placement solvers, registered in preference order (see :mod:`noodle.registry`)."""

from noodle.solvers.auto import AutoSolver
from noodle.solvers.base import SOLVERS, SolveResult, Solver, solve
from noodle.solvers.cpsat import CpSatSolver
from noodle.solvers.heuristic import HeuristicSolver
from noodle.solvers.milp import MilpSolver

__all__ = ["SOLVERS", "SolveResult", "Solver", "solve", "AutoSolver", "CpSatSolver", "MilpSolver", "HeuristicSolver"]

SOLVERS.register("auto", AutoSolver)
SOLVERS.register("cpsat", CpSatSolver)
SOLVERS.register("milp", MilpSolver)
SOLVERS.register("heuristic", HeuristicSolver)
