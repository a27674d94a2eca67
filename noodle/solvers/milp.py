"""MILP on the reduced segment model of :mod:`noodle.solvers.segments`.

With highspy installed the model goes to HiGHS directly as sparse numpy arrays (no
modelling layer: building the 98-unit x 32-node model takes ~0.1 s); the status, the
dual bound and the incumbent come from HiGHS, which is warm-started with the
heuristic's plan and handles Ctrl-C (it stops and keeps its incumbent: status
``kInterrupt``). Without highspy, CBC (bundled with PuLP) solves the same model;
PuLP gives no bound for CBC, so a CBC stop on the time limit is ``feasible`` with the
bound of :mod:`noodle.solvers.bounds` only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from noodle.errors import SolverUnavailable
from noodle.solvers.base import SolveResult, plan_from_segments
from noodle.solvers.bounds import latency_bound, throughput_bound
from noodle.solvers.limits import HIGHS_SECONDS_PER_VAR, bound_seconds, hard_stop, surely_too_large, too_large
from noodle.solvers.segments import SegmentModel, build_segment_model, plan_in_model
from noodle.solvers.tables import INF, CostTables, plan_segments, segments_value
from noodle.types import Plan, Problem

__all__ = ["MilpSolver", "HIGHS_STATUS_MAP", "model_arrays"]

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


def model_arrays(model: SegmentModel) -> dict[str, Any]:
    """The model as ``min c x`` s.t. ``row_lo <= A x <= row_hi``, ``0 <= x <= col_hi`` (COO), x = [u, h, r, T?]."""
    n, m = model.n, model.m
    S, H, R = len(model.seg), len(model.hop), len(model.ret)
    J, Ss, E = model.seg.T if S else (np.zeros(0, int),) * 3
    HJ, HK, HP = model.hop.T if H else (np.zeros(0, int),) * 3
    RJ, RK = model.ret.T if R else (np.zeros(0, int),) * 2
    u0, h0, r0 = 0, S, S + H
    throughput = model.objective != "latency"
    ncol = S + H + R + (1 if throughput else 0)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    lo: list[float] = []
    hi: list[float] = []

    def add_rows(r: np.ndarray, c: np.ndarray, v: np.ndarray) -> None:
        rows.append(r)
        cols.append(c)
        vals.append(v)

    def new_rows(k: int, lower: float, upper: float) -> int:
        first = len(lo)
        lo.extend([lower] * k)
        hi.extend([upper] * k)
        return first

    one = lambda k: np.ones(k)  # noqa: E731
    ids = np.arange(S)
    b = new_rows(2, 1.0, 1.0)
    add_rows(np.full(int((Ss == 0).sum()), b), u0 + ids[Ss == 0], one(int((Ss == 0).sum())))
    add_rows(np.full(int((E == n).sum()), b + 1), u0 + ids[E == n], one(int((E == n).sum())))
    b = new_rows(m, -INF, 1.0)
    add_rows(b + J, u0 + ids, one(S))
    if model.max_stages < m:
        b = new_rows(1, -INF, float(model.max_stages))
        add_rows(np.full(S, b), u0 + ids, one(S))
    # hop pairing at interior cuts: keys (j, p) for ends/outs and (k, p) for starts/ins
    key = lambda a, p: a * (n + 1) + p  # noqa: E731
    inner_e = (E > 0) & (E < n)
    inner_s = (Ss > 0) & (Ss < n)
    out_keys = np.unique(np.concatenate([key(J[inner_e], E[inner_e]), key(HJ, HP)]))
    in_keys = np.unique(np.concatenate([key(J[inner_s], Ss[inner_s]), key(HK, HP)]))
    b = new_rows(len(out_keys), 0.0, 0.0)
    add_rows(b + np.searchsorted(out_keys, key(HJ, HP)), h0 + np.arange(H), one(H))
    add_rows(b + np.searchsorted(out_keys, key(J[inner_e], E[inner_e])), u0 + ids[inner_e], -one(int(inner_e.sum())))
    b = new_rows(len(in_keys), 0.0, 0.0)
    add_rows(b + np.searchsorted(in_keys, key(HK, HP)), h0 + np.arange(H), one(H))
    add_rows(b + np.searchsorted(in_keys, key(J[inner_s], Ss[inner_s])), u0 + ids[inner_s], -one(int(inner_s.sum())))
    # returns
    b = new_rows(m, 0.0, 0.0)
    add_rows(b + RJ, r0 + np.arange(R), one(R))
    add_rows(b + J[E == n], u0 + ids[E == n], -one(int((E == n).sum())))
    b = new_rows(m, 0.0, 0.0)
    add_rows(b + RK, r0 + np.arange(R), one(R))
    add_rows(b + J[Ss == 0], u0 + ids[Ss == 0], -one(int((Ss == 0).sum())))
    cost = np.concatenate([model.seg_cost, model.hop_cost, model.ret_cost])
    col_hi = np.ones(ncol)
    obj = np.zeros(ncol)
    integer = np.ones(ncol, dtype=bool)
    if throughput:
        t = ncol - 1
        col_hi[t] = INF
        integer[t] = False
        obj[t] = 1.0
        b = new_rows(m, 0.0, INF)  # T - load_j >= 0
        add_rows(np.array([b + j for j in range(m)]), np.full(m, t), one(m))
        add_rows(b + J, u0 + ids, -model.seg_cost)
        add_rows(b + HJ, h0 + np.arange(H), -model.hop_cost)
        add_rows(b + RJ, r0 + np.arange(R), -model.ret_cost)
    else:
        obj[: S + H + R] = cost
        if model.lower > 0:
            b = new_rows(1, model.lower, INF)
            add_rows(np.full(S + H + R, b), np.arange(S + H + R), cost)
    col_lo = np.zeros(ncol)
    if throughput:
        col_lo[-1] = model.lower
    return {
        "rows": np.concatenate(rows).astype(np.int64), "cols": np.concatenate(cols).astype(np.int64),
        "vals": np.concatenate(vals).astype(float), "row_lo": np.array(lo), "row_hi": np.array(hi),
        "obj": obj, "col_lo": col_lo, "col_hi": col_hi, "integer": integer, "ncol": ncol, "sizes": (S, H, R),
    }


def _csc(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, ncol: int) -> tuple[np.ndarray, ...]:
    order = np.lexsort((rows, cols))
    rows, cols, vals = rows[order], cols[order], vals[order]
    return np.searchsorted(cols, np.arange(ncol + 1)).astype(np.int32), rows.astype(np.int32), vals


def _bound(tables: CostTables, objective: str, upper: float, seconds: float) -> float:
    if objective == "latency":
        return latency_bound(tables, upper=upper, time_limit_s=seconds)
    return throughput_bound(tables, upper=upper, time_limit_s=seconds)


class MilpSolver:
    """Exact MILP; proves optimality with HiGHS (bound and gap) or CBC (optimal or not)."""

    name = "milp"
    exact = True

    def __init__(self, backend: str | None = None) -> None:
        self.backend = backend

    def _backend(self) -> str:
        if self.backend:
            return self.backend
        if importlib.util.find_spec("highspy") is not None:
            return "highs"
        if importlib.util.find_spec("pulp") is None:
            raise SolverUnavailable("solver 'milp' needs HiGHS or PuLP: pip install highspy (or pulp)")
        return "cbc"

    def solve(
        self, problem: Problem, tables: CostTables, *, time_limit_s: float, hint: Plan | None = None
    ) -> SolveResult:
        backend = self._backend()
        t0 = time.perf_counter()
        deadline = t0 + time_limit_s
        obj = problem.objective
        hint_seg = plan_segments(tables, hint) if hint is not None else None
        upper = segments_value(tables, hint_seg, obj) if hint_seg else INF
        lower = 0.0
        name = f"{self.name}/{backend}"
        early = surely_too_large(tables)
        if early is not None:
            elapsed = time.perf_counter() - t0
            if hint_seg:
                return SolveResult(name, "feasible", hint, upper, None, elapsed, f"{early}: the start plan, not searched further")
            return SolveResult(name, "unknown", None, None, None, elapsed, early)
        model = build_segment_model(tables, obj, upper=upper)  # size first: the bound is not free at 128 nodes
        why = too_large(model, deadline - time.perf_counter(), HIGHS_SECONDS_PER_VAR if backend == "highs" else 2e-5)
        if why is None and hint_seg:
            lower = _bound(tables, obj, upper, bound_seconds(time_limit_s))
            model = replace(model, lower=max(0.0, float(lower)))
        if why is not None:
            elapsed = time.perf_counter() - t0
            if hint_seg:
                return SolveResult(name, "feasible", hint, upper, min(lower, upper), elapsed,
                                   f"{why}: the start plan, not searched further")
            return SolveResult(name, "unknown", None, None, None, elapsed, why)
        start = plan_in_model(model, hint_seg) if hint_seg else None
        remaining = 0.95 * (deadline - time.perf_counter()) - 0.02
        if remaining < 0.05 and hint_seg:  # set-up spent the time: the start plan, no search
            return SolveResult(name, "feasible", hint, upper, min(lower, upper), time.perf_counter() - t0,
                               "the time limit was spent building the model: the start plan, not searched further")
        remaining = max(0.05, remaining)
        if backend == "highs":
            status, x, value, bound, interrupted = _solve_highs(model, remaining, start, upper, deadline)
        else:
            status, x, value, bound, interrupted = _solve_cbc(model, remaining, start, upper)
        elapsed = time.perf_counter() - t0
        if status == "infeasible":
            if hint_seg:  # the reductions keep the hint, so this cannot happen; report the hint
                return SolveResult(name, "optimal", hint, upper, upper, elapsed, "the start plan is optimal")
            return SolveResult(name, "infeasible", None, None, None, elapsed)
        if x is None:
            if hint_seg:
                return SolveResult(name, "feasible", hint, upper, max(lower, bound or 0.0), elapsed,
                                   f"{backend} found nothing better than the start plan", interrupted=interrupted)
            return SolveResult(name, status, None, None, None, elapsed, f"{backend} found no plan in {time_limit_s:g} s",
                               interrupted=interrupted)
        S = len(model.seg)
        chosen = [tuple(int(v) for v in model.seg[i]) for i in np.flatnonzero(x[:S] > 0.5)]
        plan = plan_from_segments(tables, chosen)
        bound = value if status == "optimal" else max(lower, bound if bound is not None else -INF)
        note = "interrupted (Ctrl-C): best plan so far" if interrupted else ""
        return SolveResult(name, status, plan, value, min(bound, value), elapsed, note, interrupted=interrupted)


def _solve_highs(model: SegmentModel, time_limit: float, start: dict | None, upper: float, deadline: float):
    import highspy

    a = model_arrays(model)
    start_idx, index, value = _csc(a["rows"], a["cols"], a["vals"], a["ncol"])
    lp = highspy.HighsLp()
    lp.num_col_ = a["ncol"]
    lp.num_row_ = len(a["row_lo"])
    inf = highspy.kHighsInf
    lp.col_cost_ = a["obj"]
    lp.col_lower_ = a["col_lo"]
    lp.col_upper_ = np.where(np.isinf(a["col_hi"]), inf, a["col_hi"])
    lp.row_lower_ = np.where(np.isinf(a["row_lo"]), -inf, a["row_lo"])
    lp.row_upper_ = np.where(np.isinf(a["row_hi"]), inf, a["row_hi"])
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = start_idx
    lp.a_matrix_.index_ = index
    lp.a_matrix_.value_ = value
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous for i in a["integer"]]
    with _stdout_to_stderr():
        h = highspy.Highs()  # the constructor prints a banner
    h.silent()
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("mip_rel_gap", 1e-8)
    h.setOptionValue("threads", 1)
    h.setOptionValue("presolve", "off")  # measured: presolve's probing costs seconds and rarely pays here
    h.setOptionValue("mip_heuristic_run_feasibility_jump", False)  # measured: 8 s before the root at 130 x 64
    h.HandleKeyboardInterrupt = True
    h.passModel(lp)
    if start is not None:
        x0 = np.concatenate([start["u"], start["h"], start["r"]])
        if model.objective != "latency":
            x0 = np.append(x0, upper)
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
        return "infeasible", None, None, None, interrupted
    if info.primal_solution_status != 2:  # 2 = a feasible point is held
        return ("unknown" if status != "optimal" else status), None, None, float(info.mip_dual_bound), interrupted
    x = np.array(h.getSolution().col_value)
    return status, x, float(info.objective_function_value), float(info.mip_dual_bound), interrupted


def _solve_cbc(model: SegmentModel, time_limit: float, start: dict | None, upper: float):
    import pulp

    a = model_arrays(model)
    lp = pulp.LpProblem("noodle", pulp.LpMinimize)
    xs = [pulp.LpVariable(f"x{i}", lowBound=float(a["col_lo"][i]),
                          upBound=None if np.isinf(a["col_hi"][i]) else float(a["col_hi"][i]),
                          cat="Integer" if a["integer"][i] else "Continuous") for i in range(a["ncol"])]
    lp += pulp.lpSum(float(c) * xs[i] for i, c in enumerate(a["obj"]) if c)
    by_row: dict[int, list] = {}
    for r, c, v in zip(a["rows"].tolist(), a["cols"].tolist(), a["vals"].tolist()):
        by_row.setdefault(r, []).append(v * xs[c])
    for r in range(len(a["row_lo"])):
        expr = pulp.lpSum(by_row.get(r, []))
        lo_, hi_ = a["row_lo"][r], a["row_hi"][r]
        if lo_ == hi_:
            lp += expr == float(lo_)
        else:
            if np.isfinite(lo_):
                lp += expr >= float(lo_)
            if np.isfinite(hi_):
                lp += expr <= float(hi_)
    if start is not None:
        x0 = np.concatenate([start["u"], start["h"], start["r"]])
        for var, v in zip(xs, x0):
            var.setInitialValue(float(v))
        if model.objective != "latency":
            xs[-1].setInitialValue(float(upper))
    solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, round(time_limit)), gapRel=0.0, warmStart=start is not None)
    try:
        with _stdout_to_stderr():
            lp.solve(solver)
    except KeyboardInterrupt:
        return "unknown", None, None, None, True
    if lp.status == pulp.LpStatusInfeasible:
        return "infeasible", None, None, None, False
    if lp.sol_status == pulp.LpSolutionOptimal:
        status = "optimal"
    elif lp.sol_status == pulp.LpSolutionIntegerFeasible:
        status = "feasible"
    else:
        return "unknown", None, None, None, False
    x = np.array([v.varValue or 0.0 for v in xs])
    return status, x, float(pulp.value(lp.objective)), None, False
