"""``solve_joint``: place several models on one cluster (``auto``, ``cpsat`` or ``heuristic``).

``heuristic`` is :mod:`.heuristic`'s coordinate descent (no proof). ``cpsat`` runs it first as a warm start
(at most ``WARM_START_SHARE`` of the time), then :mod:`.cpsat`'s exact model, and keeps the better plan;
``auto`` is ``cpsat`` where OR-Tools is installed and the model is small enough, else the heuristic.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass

from noodle.errors import InfeasibleError, NoodleError, SolverUnavailable
from noodle.joint import JointPlan, JointProblem
from noodle.solvers.base import relative_gap
from noodle.solvers.joint.cpsat import solve_cpsat
from noodle.solvers.joint.heuristic import solve_heuristic
from noodle.solvers.joint.model import (
    JointTables, build_joint_tables, fits, joint_plan, joint_value, tokens_per_s,
)

__all__ = ["JOINT_SOLVERS", "JointResult", "solve_joint", "WARM_START_SHARE"]

JOINT_SOLVERS = ("auto", "cpsat", "heuristic")
WARM_START_SHARE = 0.3


@dataclass(frozen=True)
class JointResult:
    """A joint plan with its objective ``U`` (ms per round, see :mod:`.model`) and each model's tokens/s."""

    solver: str
    status: str  # optimal | feasible | heuristic
    plan: JointPlan
    objective_ms: float
    bound_ms: float | None
    solve_time_s: float
    tokens_per_s: tuple[float, ...]
    note: str = ""

    @property
    def gap(self) -> float | None:
        return None if self.bound_ms is None else relative_gap(self.objective_ms, self.bound_ms)


def solve_joint(jp: JointProblem, *, solver: str = "auto", time_limit_s: float = 10.0,
                tables: JointTables | None = None) -> JointResult:
    """Place every model of ``jp`` on its shared cluster.

    Raises:
        SolverUnavailable: an unknown solver name, or ``cpsat`` without OR-Tools.
        InfeasibleError: no placement fits (proven by CP-SAT, or a model that fits nowhere even alone), or
            the models' required tokens/s cannot all be met (the words give each model's best rate).
        NoodleError: no plan found within the time limit (without a proof that none exists).
    """
    if solver not in JOINT_SOLVERS:
        raise SolverUnavailable(f"unknown joint solver {solver!r}; valid names: {', '.join(JOINT_SOLVERS)}")
    has_ortools = importlib.util.find_spec("ortools") is not None
    if solver == "cpsat" and not has_ortools:
        raise SolverUnavailable("solver 'cpsat' needs OR-Tools: pip install ortools")
    t0 = time.perf_counter()
    jt = tables or build_joint_tables(jp)
    exact = solver == "cpsat" or (solver == "auto" and has_ortools)
    warm = time_limit_s * (WARM_START_SHARE if exact else 1.0)
    plans = solve_heuristic(jt, time_limit_s=warm)
    name, status, bound, note = "heuristic", "heuristic", None, ""
    if exact:
        left = max(0.1, time_limit_s - (time.perf_counter() - t0))
        st, got, lower, why = solve_cpsat(jt, time_limit_s=left, hint=plans)
        if st == "infeasible":
            raise InfeasibleError(f"{why} ({len(jp.models)} models on {jt.num_nodes} nodes)")
        if got is not None and (plans is None or joint_value(jt, got) <= joint_value(jt, plans) * (1 + 1e-9)):
            plans, name, status, bound, note = got, "cpsat", st, lower, why
        elif plans is not None:
            name, bound = "cpsat/heuristic", lower
            status = "feasible" if lower is not None else "heuristic"
            note = why or "CP-SAT found nothing better: the heuristic's plan"
        else:
            note = why
    if plans is None:
        raise NoodleError(f"joint solver {solver!r}: no plan found in {time_limit_s:g} s"
                          + (f" ({note})" if note else "") + "; raise the time limit, or give the models more memory")
    problem = fits(jt, plans)
    if problem is not None:  # a solver bug, never user input
        raise NoodleError(f"joint solver {name}: plan over memory: {problem}")
    value = joint_value(jt, plans)
    rates = tuple(tokens_per_s(jp, value))
    if jp.required and value > 1e3 * (1 + 1e-9):
        short = ", ".join(f"{m.name} {r:.1f} of {m.weight:g}" for m, r in zip(jp.models, rates))
        proof = "the best plan" if status == "optimal" else "the best plan found"
        raise InfeasibleError(f"models: the required tokens/s cannot all be met: {proof} reaches {short} tokens/s "
                              f"(the busiest node would need {value / 1e3:.0%} of its time)")
    return JointResult(name, status, joint_plan(jt, plans), value, bound, time.perf_counter() - t0, rates, note)

