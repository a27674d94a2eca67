"""The two MILP backends: HiGHS (highspy, in memory) and CBC (bundled with PuLP, from an MPS file).

Both take the one :class:`~noodle.solvers.exact.milp_model.MilpModel`, a start vector and their options, and
return a :class:`BackendResult` in noodle's statuses (through ``HIGHS_STATUS_MAP`` / ``CBC_STATUS_MAP``).
No HiGHS or PuLP object leaves this module.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from noodle.solvers.exact.limits import hard_stop
from noodle.solvers.exact.milp_model import MilpModel, write_mps

__all__ = ["BackendResult", "HIGHS_STATUS_MAP", "CBC_STATUS_MAP", "HIGHS_DEFAULTS", "CBC_DEFAULTS", "solve_highs",
           "solve_cbc"]

# HiGHS model status name -> noodle status (names, so highspy need not be imported here).
HIGHS_STATUS_MAP = {
    "kOptimal": "optimal",
    "kInfeasible": "infeasible",
    "kTimeLimit": "feasible",
    "kInterrupt": "feasible",
    "kIterationLimit": "feasible",
    "kSolutionLimit": "feasible",
    "kObjectiveBound": "feasible",
    "kObjectiveTarget": "feasible",
}
# PuLP's solution status (``pulp.LpSolution`` names) of a CBC run -> noodle status.
CBC_STATUS_MAP = {
    "Optimal Solution Found": "optimal",
    "Solution Found": "feasible",
    "No Solution Exists": "infeasible",
    "No Solution Found": "unknown",
    "Solution is Unbounded": "unknown",
}
# Measured: presolve's probing costs seconds and rarely pays here; feasibility jump took 8 s before the root at 130 x 64.
HIGHS_DEFAULTS: Mapping[str, Any] = {"mip_rel_gap": 1e-8, "threads": 1, "presolve": False}
CBC_DEFAULTS: Mapping[str, Any] = {"mip_rel_gap": 0.0, "threads": None, "presolve": None}


class BackendResult(NamedTuple):
    status: str
    x: np.ndarray | None  # the incumbent's column values, None without one
    value: float | None
    bound: float | None  # the backend's dual bound (HiGHS only)
    interrupted: bool


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send C-level writes to fd 1 (HiGHS prints a banner) to stderr, keeping stdout for data."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def solve_highs(mm: MilpModel, time_limit: float, x0: np.ndarray | None, deadline: float,
                options: Mapping[str, Any]) -> BackendResult:
    """HiGHS on ``mm`` from ``x0``; Ctrl-C stops it with its incumbent (``kInterrupt``)."""
    import highspy

    opts = {**HIGHS_DEFAULTS, **options}
    lp = highspy.HighsLp()
    lp.num_col_ = mm.ncol
    lp.num_row_ = len(mm.row_lo)
    inf = highspy.kHighsInf
    lp.col_cost_ = mm.obj
    lp.col_lower_ = mm.col_lo
    lp.col_upper_ = np.where(np.isinf(mm.col_hi), inf, mm.col_hi)
    lp.row_lower_ = np.where(np.isinf(mm.row_lo), -inf, mm.row_lo)
    lp.row_upper_ = np.where(np.isinf(mm.row_hi), inf, mm.row_hi)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = mm.start
    lp.a_matrix_.index_ = mm.index
    lp.a_matrix_.value_ = mm.value
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous for i in mm.integer]
    with _stdout_to_stderr():
        h = highspy.Highs()  # the constructor prints a banner
    h.silent()
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("mip_rel_gap", float(opts["mip_rel_gap"]))
    h.setOptionValue("threads", int(opts["threads"]))
    h.setOptionValue("presolve", "on" if opts["presolve"] else "off")
    h.setOptionValue("mip_heuristic_run_feasibility_jump", False)
    h.HandleKeyboardInterrupt = True
    h.passModel(lp)
    if x0 is not None:
        sol = highspy.HighsSolution()
        sol.col_value = x0.tolist()
        h.setSolution(sol)
    with _stdout_to_stderr(), hard_stop(deadline, h.cancelSolve) as fired:  # HiGHS's time_limit can overrun
        h.solve()
    code = h.getModelStatus()
    name = getattr(code, "name", str(code)).split(".")[-1]
    status = HIGHS_STATUS_MAP.get(name, "unknown")
    interrupted = name == "kInterrupt" and not fired.is_set()
    info = h.getInfo()
    if status == "infeasible":
        return BackendResult("infeasible", None, None, None, interrupted)
    if info.primal_solution_status != 2:  # 2 = a feasible point is held
        return BackendResult("unknown" if status != "optimal" else status, None, None, float(info.mip_dual_bound),
                             interrupted)
    x = np.array(h.getSolution().col_value)
    return BackendResult(status, x, float(info.objective_function_value), float(info.mip_dual_bound), interrupted)


def solve_cbc(mm: MilpModel, time_limit: float, x0: np.ndarray | None, options: Mapping[str, Any]) -> BackendResult:
    """CBC on ``mm`` written as MPS, from ``x0``; PuLP runs CBC and reads its solution. CBC gives no bound."""
    import pulp

    opts = {**CBC_DEFAULTS, **options}
    with tempfile.TemporaryDirectory(prefix="noodle-cbc-") as tmp:
        path = os.path.join(tmp, "model.mps")
        write_mps(mm, path)
        columns, lp = pulp.LpProblem.fromMPS(path, sense=pulp.LpMinimize)
        xs = [columns[f"x{j}"] for j in range(mm.ncol)]
        if x0 is not None:
            for var, v in zip(xs, x0.tolist()):
                var.setInitialValue(float(v))
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, round(time_limit)), gapRel=float(opts["mip_rel_gap"]),
                                   warmStart=x0 is not None, threads=opts["threads"], presolve=opts["presolve"],
                                   keepFiles=False)
        try:
            with _stdout_to_stderr():
                lp.solve(solver)
        except KeyboardInterrupt:
            return BackendResult("unknown", None, None, None, True)
    if lp.status == pulp.LpStatusInfeasible:
        return BackendResult("infeasible", None, None, None, False)
    status = CBC_STATUS_MAP.get(pulp.LpSolution.get(lp.sol_status, ""), "unknown")
    if status not in ("optimal", "feasible"):
        return BackendResult("unknown", None, None, None, False)
    x = np.array([v.varValue or 0.0 for v in xs])
    return BackendResult(status, x, float(pulp.value(lp.objective)), None, False)
