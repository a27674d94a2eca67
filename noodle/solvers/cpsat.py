"""CP-SAT (OR-Tools) on the segment model of :mod:`noodle.solvers.segments`.

Costs are scaled to integer nanoseconds (``SCALE`` per ms) because CP-SAT works
on integers; the plan is re-evaluated in floating point afterwards. The search is
warm-started with the heuristic's plan as a hint and runs on all cores.
"""

from __future__ import annotations

import importlib.util
import os
import time

from noodle.errors import SolverUnavailable
from noodle.solvers.base import SolveResult, plan_from_segments
from noodle.solvers.segments import index_segments
from noodle.solvers.tables import CostTables
from noodle.types import Plan, Problem

__all__ = ["CpSatSolver", "SCALE"]

SCALE = 1_000_000  # integer units per ms (1 ns)


def _status_map() -> dict[int, str]:
    from ortools.sat.python import cp_model

    return {
        cp_model.OPTIMAL: "optimal",
        cp_model.FEASIBLE: "feasible",
        cp_model.INFEASIBLE: "infeasible",
        cp_model.UNKNOWN: "unknown",
        cp_model.MODEL_INVALID: "invalid",
    }


def _ns(ms: float) -> int:
    return int(round(ms * SCALE))


class CpSatSolver:
    """Exact: proves optimality (or infeasibility) when the time limit allows."""

    name = "cpsat"
    exact = True

    def solve(
        self, problem: Problem, tables: CostTables, *, time_limit_s: float, hint: Plan | None = None
    ) -> SolveResult:
        if importlib.util.find_spec("ortools") is None:
            raise SolverUnavailable("solver 'cpsat' needs OR-Tools: pip install ortools")
        from ortools.sat.python import cp_model

        t0 = time.perf_counter()
        ix = index_segments(tables)
        m, n = len(tables.nodes), tables.n
        md = cp_model.CpModel()
        u = [md.new_bool_var(f"u{i}") for i in range(len(ix.segs))]
        h = {key: md.new_bool_var(f"h{key}") for key in ix.hops}
        r = {(j, k): md.new_bool_var(f"r{j}_{k}") for j in range(m) for k in range(m)}

        def start(j: int, p: int) -> list:
            return [u[i] for i in ix.starts_at.get((j, p), [])]

        def end(j: int, p: int) -> list:
            return [u[i] for i in ix.ends_at.get((j, p), [])]

        md.add(sum(v for j in range(m) for v in start(j, 0)) == 1)
        md.add(sum(v for j in range(m) for v in end(j, n)) == 1)
        for p in range(1, n):
            md.add(sum(v for j in range(m) for v in end(j, p)) == sum(v for j in range(m) for v in start(j, p)))
        for j in range(m):
            md.add_at_most_one(u[i] for i in ix.by_node.get(j, []))
        md.add(sum(u) <= tables.max_stages)
        out_h: dict[tuple[int, int], list] = {}
        in_h: dict[tuple[int, int], list] = {}
        for (j, k, p), var in h.items():
            out_h.setdefault((j, p), []).append(var)
            in_h.setdefault((k, p), []).append(var)
        for p in range(1, n):
            for j in range(m):
                md.add(sum(out_h.get((j, p), [])) == sum(end(j, p)))
                md.add(sum(in_h.get((j, p), [])) == sum(start(j, p)))
        for j in range(m):
            md.add(sum(r[j, k] for k in range(m)) == sum(end(j, n)))
            md.add(sum(r[k, j] for k in range(m)) == sum(start(j, 0)))

        h_from: dict[int, list] = {}
        for (j, k, p), var in h.items():
            h_from.setdefault(j, []).append(_ns(tables.hop[j, k, p]) * var)

        def cost_of_node(j: int):
            own = (_ns(tables.compute[ix.segs[i]]) * u[i] for i in ix.by_node.get(j, []))
            return sum(own) + sum(h_from.get(j, [])) + sum(_ns(tables.ret[j, k]) * r[j, k] for k in range(m))

        if problem.objective == "latency":
            md.minimize(
                sum(_ns(tables.compute[j, s, e]) * u[i] for i, (j, s, e) in enumerate(ix.segs))
                + sum(_ns(tables.hop[j, k, p]) * var for (j, k, p), var in h.items())
                + sum(_ns(tables.ret[j, k]) * var for (j, k), var in r.items())
            )
        else:
            upper = _ns(max(tables.compute[seg] for seg in ix.segs) + tables.hop.max() + tables.ret.max()) + 1
            t = md.new_int_var(0, max(upper, 1), "bottleneck")
            for j in range(m):
                md.add(t >= cost_of_node(j))
            md.minimize(t)

        if hint is not None:
            _add_hint(md, tables, ix, u, h, r, hint)
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = max(0.05, time_limit_s - (time.perf_counter() - t0))
        solver.parameters.num_workers = max(1, min(8, os.cpu_count() or 1))
        solver.parameters.catch_sigint_signal = True
        code = solver.solve(md)
        status = _status_map().get(code, "unknown")
        elapsed = time.perf_counter() - t0
        if status == "infeasible":
            return SolveResult(self.name, "infeasible", None, None, None, elapsed)
        if status not in ("optimal", "feasible"):
            return SolveResult(self.name, status, None, None, None, elapsed, f"CP-SAT found no plan in {time_limit_s:g} s")
        chosen = [ix.segs[i] for i, var in enumerate(u) if solver.value(var)]
        plan = plan_from_segments(tables, chosen)
        bound = solver.best_objective_bound / SCALE
        obj = solver.objective_value / SCALE
        return SolveResult(self.name, status, plan, obj, min(bound, obj), elapsed)


def _add_hint(md, tables: CostTables, ix, u, h, r, hint: Plan) -> None:
    pos = {nd.id: j for j, nd in enumerate(tables.nodes)}
    want = {(pos[s.node], s.start, s.end) for s in hint.stages if s.node in pos}
    for i, seg in enumerate(ix.segs):
        md.add_hint(u[i], seg in want)
    stages = hint.stages
    pairs = {(pos[a.node], pos[b.node], a.end) for a, b in zip(stages, stages[1:]) if a.node in pos and b.node in pos}
    for key, var in h.items():
        md.add_hint(var, key in pairs)
    last, first = pos.get(stages[-1].node), pos.get(stages[0].node)
    for key, var in r.items():
        md.add_hint(var, key == (last, first))

