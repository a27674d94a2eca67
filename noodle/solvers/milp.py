"""MILP (PuLP) on the segment model of :mod:`noodle.solvers.segments`.

Uses HiGHS through highspy when it is installed, CBC (bundled with PuLP)
otherwise. PuLP reports a HiGHS time-limit stop as "Optimal", so the status and
the bound are read from HiGHS itself; CBC gives no bound through PuLP, so a CBC
stop on the time limit is reported ``feasible`` with an unknown gap. Both are
warm-started from the heuristic's plan.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from noodle.errors import SolverUnavailable
from noodle.solvers.base import SolveResult, plan_from_segments
from noodle.solvers.segments import index_segments
from noodle.solvers.tables import CostTables, plan_segments, segments_value
from noodle.types import Plan, Problem

__all__ = ["MilpSolver", "HIGHS_STATUS_MAP"]

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


def _highs_class() -> Any:
    import highspy
    import pulp

    class WarmHiGHS(pulp.HiGHS):  # type: ignore[misc, valid-type]
        """pulp.HiGHS that hands the variables' initial values to HiGHS as a start."""

        def callSolver(self, lp: Any) -> None:  # noqa: N802 (PuLP's name)
            cols = lp.variables()
            if any(v.varValue is not None for v in cols):
                sol = highspy.HighsSolution()
                values = [0.0] * len(cols)
                for v in cols:
                    values[v.index] = float(v.varValue or 0.0)
                sol.col_value = values
                lp.solverModel.setSolution(sol)
            lp.solverModel.run()

    return WarmHiGHS


class MilpSolver:
    """Exact MILP; proves optimality with HiGHS (bound and gap) or CBC (optimal or not)."""

    name = "milp"
    exact = True

    def __init__(self, backend: str | None = None) -> None:
        self.backend = backend

    def _backend(self) -> str:
        if importlib.util.find_spec("pulp") is None:
            raise SolverUnavailable("solver 'milp' needs PuLP: pip install pulp")
        if self.backend:
            return self.backend
        return "highs" if importlib.util.find_spec("highspy") is not None else "cbc"

    def solve(
        self, problem: Problem, tables: CostTables, *, time_limit_s: float, hint: Plan | None = None
    ) -> SolveResult:
        backend = self._backend()
        import pulp

        t0 = time.perf_counter()
        ix = index_segments(tables)
        m, n = len(tables.nodes), tables.n
        lp = pulp.LpProblem("noodle", pulp.LpMinimize)
        u = [pulp.LpVariable(f"u{i}", cat="Binary") for i in range(len(ix.segs))]
        h = {key: pulp.LpVariable(f"h_{key[0]}_{key[1]}_{key[2]}", cat="Binary") for key in ix.hops}
        r = {(j, k): pulp.LpVariable(f"r_{j}_{k}", cat="Binary") for j in range(m) for k in range(m)}

        def start(j: int, p: int) -> Any:
            return pulp.lpSum(u[i] for i in ix.starts_at.get((j, p), []))

        def end(j: int, p: int) -> Any:
            return pulp.lpSum(u[i] for i in ix.ends_at.get((j, p), []))

        lp += pulp.lpSum(start(j, 0) for j in range(m)) == 1
        lp += pulp.lpSum(end(j, n) for j in range(m)) == 1
        for p in range(1, n):
            lp += pulp.lpSum(end(j, p) for j in range(m)) == pulp.lpSum(start(j, p) for j in range(m))
        for j in range(m):
            lp += pulp.lpSum(u[i] for i in ix.by_node.get(j, [])) <= 1
        lp += pulp.lpSum(u) <= tables.max_stages
        out_h: dict[tuple[int, int], list] = {}
        in_h: dict[tuple[int, int], list] = {}
        cost_out: dict[int, list] = {}
        for (j, k, p), var in h.items():
            out_h.setdefault((j, p), []).append(var)
            in_h.setdefault((k, p), []).append(var)
            cost_out.setdefault(j, []).append(float(tables.hop[j, k, p]) * var)
        for p in range(1, n):
            for j in range(m):
                lp += pulp.lpSum(out_h.get((j, p), [])) == end(j, p)
                lp += pulp.lpSum(in_h.get((j, p), [])) == start(j, p)
        for j in range(m):
            lp += pulp.lpSum(r[j, k] for k in range(m)) == end(j, n)
            lp += pulp.lpSum(r[k, j] for k in range(m)) == start(j, 0)

        seg_cost = [float(tables.compute[seg]) for seg in ix.segs]
        if problem.objective == "latency":
            lp += (
                pulp.lpSum(c * v for c, v in zip(seg_cost, u))
                + pulp.lpSum(float(tables.hop[key]) * v for key, v in h.items())
                + pulp.lpSum(float(tables.ret[key]) * v for key, v in r.items())
            )
        else:
            t = pulp.LpVariable("bottleneck", lowBound=0)
            lp += t
            for j in range(m):
                lp += t >= (
                    pulp.lpSum(seg_cost[i] * u[i] for i in ix.by_node.get(j, []))
                    + pulp.lpSum(cost_out.get(j, []))
                    + pulp.lpSum(float(tables.ret[j, k]) * r[j, k] for k in range(m))
                )
        if hint is not None:
            _set_start(tables, ix, u, h, r, hint)
            if problem.objective != "latency":
                t.setInitialValue(segments_value(tables, plan_segments(tables, hint), problem.objective))

        remaining = max(0.05, time_limit_s - (time.perf_counter() - t0))
        if backend == "highs":
            solver = _highs_class()(msg=False, timeLimit=remaining, gapRel=0.0)
        else:
            solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, round(remaining)), gapRel=0.0, warmStart=hint is not None)
        with _stdout_to_stderr():
            lp.solve(solver)
        status, bound = self._read_status(lp, backend)
        elapsed = time.perf_counter() - t0
        name = f"{self.name}/{backend}"
        if status == "infeasible":
            return SolveResult(name, "infeasible", None, None, None, elapsed)
        if status not in ("optimal", "feasible"):
            return SolveResult(name, status, None, None, None, elapsed, f"{backend} found no plan in {time_limit_s:g} s")
        chosen = [ix.segs[i] for i, var in enumerate(u) if (var.varValue or 0) > 0.5]
        obj = float(pulp.value(lp.objective))
        if status == "optimal":
            bound = obj
        return SolveResult(name, status, plan_from_segments(tables, chosen), obj, bound, elapsed)

    @staticmethod
    def _read_status(lp: Any, backend: str) -> tuple[str, float | None]:
        import pulp

        if backend == "highs":
            model = lp.solverModel
            code = model.getModelStatus()
            status = HIGHS_STATUS_MAP.get(getattr(code, "name", str(code)).split(".")[-1], "unknown")
            info = model.getInfo()
            if status == "feasible" and info.primal_solution_status != 2:  # 2 = feasible point held
                status = "unknown"
            bound = float(info.mip_dual_bound) if status == "feasible" else None
            return status, bound
        if lp.status == pulp.LpStatusInfeasible:
            return "infeasible", None
        if lp.sol_status == pulp.LpSolutionOptimal:
            return "optimal", None
        if lp.sol_status == pulp.LpSolutionIntegerFeasible:
            return "feasible", None
        return "unknown", None


def _set_start(tables: CostTables, ix, u, h, r, hint: Plan) -> None:
    pos = {nd.id: j for j, nd in enumerate(tables.nodes)}
    want = {(pos[s.node], s.start, s.end) for s in hint.stages if s.node in pos}
    for i, seg in enumerate(ix.segs):
        u[i].setInitialValue(1 if seg in want else 0)
    st = hint.stages
    pairs = {(pos[a.node], pos[b.node], a.end) for a, b in zip(st, st[1:]) if a.node in pos and b.node in pos}
    for key, var in h.items():
        var.setInitialValue(1 if key in pairs else 0)
    last, first = pos.get(st[-1].node), pos.get(st[0].node)
    for key, var in r.items():
        var.setInitialValue(1 if key == (last, first) else 0)

