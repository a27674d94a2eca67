"""noodle: run one large language model across several unequal machines.

The library API: describe a :class:`Problem` (or load a spec), call :func:`solve`,
turn the result into a plan file with :func:`plan_document`.

>>> from noodle import load_spec, solve, plan_document
>>> spec, problem = load_spec("specs/gpt2-home-lab.yaml")        # doctest: +SKIP
>>> result = solve(problem, solver="auto", time_limit_s=10)      # doctest: +SKIP
>>> print(plan_document(problem, result).objective_ms)           # doctest: +SKIP
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

from noodle.errors import ExecutorError, InfeasibleError, ModelError, NoodleError, SolverUnavailable, SpecError
from noodle.graph import (
    CostModel, DefaultCostModel, Evaluation, PerNodeCostModel, build_cost_graph, cost_model_for, evaluate,
)
from noodle.plandoc import PlanDoc, dump_plan, load_plan, plan_document
from noodle.solvers import SOLVERS, SolveResult, solve
from noodle.spec import Spec, load_spec, parse_spec
from noodle.types import Cluster, Constraints, Link, Node, NodeProfile, Pin, Plan, Problem, Stage, Unit, Workload

try:
    __version__ = _dist_version("noodle")  # package metadata: pyproject.toml is the one place the version lives
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"

__all__ = [
    "NoodleError", "SpecError", "InfeasibleError", "SolverUnavailable", "ExecutorError", "ModelError",
    "CostModel", "DefaultCostModel", "PerNodeCostModel", "Evaluation", "evaluate", "cost_model_for", "build_cost_graph",
    "PlanDoc", "plan_document", "dump_plan", "load_plan",
    "SOLVERS", "SolveResult", "solve",
    "Spec", "load_spec", "parse_spec",
    "Unit", "Node", "NodeProfile", "Link", "Cluster", "Workload", "Pin", "Constraints", "Problem", "Stage", "Plan",
]
