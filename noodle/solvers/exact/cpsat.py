"""CP-SAT (OR-Tools) on the reduced segment model of :mod:`noodle.solvers.exact.segments`.

Costs are scaled to integer nanoseconds (``SCALE`` per ms) because CP-SAT works on
integers; the plan is re-evaluated in floating point afterwards. The heuristic's plan
is the hint and the incumbent that reduces the model; the typed-knapsack bound
(:mod:`noodle.solvers.bounds`) is added as a constraint on the objective (lowered by
the worst rounding, so it never cuts the optimum). Ctrl-C stops the search
(``catch_sigint_signal``) and the best solution is returned, marked ``interrupted``
when the stop came well before the time limit without a proof.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from noodle.errors import SolverUnavailable
from noodle.solvers.base import SolveResult, SolverBase, plan_from_segments
from noodle.solvers.bounds import objective_bound
from noodle.solvers.exact.limits import CPSAT_SECONDS_PER_VAR, bound_seconds, hard_stop, surely_too_large, too_large
from noodle.solvers.exact.segments import build_segment_model, plan_in_model
from noodle.solvers.tables import INF, CostTables, plan_segments, segments_value
from noodle.types import Plan, Problem

__all__ = ["CpSatSolver", "SCALE", "STATUS_MAP"]

SCALE = 1_000_000  # integer units per ms (1 ns)


# CP-SAT status name (``CpSolver.status_name``) -> noodle status.
STATUS_MAP = {
    "OPTIMAL": "optimal",
    "FEASIBLE": "feasible",
    "INFEASIBLE": "infeasible",
    "UNKNOWN": "unknown",
    "MODEL_INVALID": "invalid",
}


def _ns(ms: float) -> int:
    return int(round(ms * SCALE))


class CpSatSolver(SolverBase):
    """Exact: proves optimality (or infeasibility) when the time limit allows.

    Options: ``num_workers`` (default: the CPU count, at most 8), ``presolve`` (default off).
    """

    name = "cpsat"
    exact = True
    requires = ("ortools",)
    options = {"num_workers": int, "presolve": bool}

    def solve(
        self, problem: Problem, tables: CostTables, *, time_limit_s: float, hint: Plan | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> SolveResult:
        if not self.is_installed():
            raise SolverUnavailable("solver 'cpsat' needs OR-Tools: pip install ortools")
        from ortools.sat.python import cp_model

        opts = dict(options or {})

        t0 = time.perf_counter()
        deadline = t0 + time_limit_s
        obj = problem.objective
        hint_seg = plan_segments(tables, hint) if hint is not None else None
        upper = segments_value(tables, hint_seg, obj) if hint_seg else INF
        lower = 0.0
        early = surely_too_large(tables)
        if early is not None:
            elapsed = time.perf_counter() - t0
            if hint_seg:
                return SolveResult(self.name, "feasible", hint, upper, None, elapsed, f"{early}: the start plan, not searched further")
            return SolveResult(self.name, "unknown", None, None, None, elapsed, early)
        model = build_segment_model(tables, obj, upper=upper)  # size first: the bound is not free at 128 nodes
        why = too_large(model, deadline - time.perf_counter(), CPSAT_SECONDS_PER_VAR)
        if why is None and hint_seg:
            secs = bound_seconds(time_limit_s)
            lower = objective_bound(tables, obj, upper=upper, time_limit_s=secs)
            model = replace(model, lower=max(0.0, float(lower)))
        if why is not None:
            elapsed = time.perf_counter() - t0
            if hint_seg:
                return SolveResult(self.name, "feasible", hint, upper, min(lower, upper), elapsed,
                                   f"{why}: the start plan, not searched further")
            return SolveResult(self.name, "unknown", None, None, None, elapsed, why)
        m, n = model.m, model.n
        md = cp_model.CpModel()
        u = [md.new_bool_var(f"u{i}") for i in range(len(model.seg))]
        h = [md.new_bool_var(f"h{i}") for i in range(len(model.hop))]
        r = [md.new_bool_var(f"r{i}") for i in range(len(model.ret))]
        J, S, E = (model.seg[:, c].tolist() for c in range(3))
        md.add_exactly_one([u[i] for i in range(len(u)) if S[i] == 0])
        md.add_exactly_one([u[i] for i in range(len(u)) if E[i] == n])
        by_node = defaultdict(list)
        ends, starts = defaultdict(list), defaultdict(list)
        for i, (j, s, e) in enumerate(zip(J, S, E)):
            by_node[j].append(u[i])
            ends[j, e].append(u[i])
            starts[j, s].append(u[i])
        for j in range(m):
            md.add_at_most_one(by_node[j])
        if model.max_stages < m:
            md.add(sum(u) <= model.max_stages)
        if model.min_stages > 1:
            md.add(sum(u) >= model.min_stages)
        outs, ins = defaultdict(list), defaultdict(list)
        for i, (j, k, p) in enumerate(model.hop.tolist()):
            outs[j, p].append(h[i])
            ins[k, p].append(h[i])
        for p in range(1, n):
            for j in range(m):
                if ends.get((j, p)) or outs.get((j, p)):
                    md.add(sum(outs.get((j, p), [])) == sum(ends.get((j, p), [])))
                if starts.get((j, p)) or ins.get((j, p)):
                    md.add(sum(ins.get((j, p), [])) == sum(starts.get((j, p), [])))
        r_out, r_in = defaultdict(list), defaultdict(list)
        for i, (j, k) in enumerate(model.ret.tolist()):
            r_out[j].append(r[i])
            r_in[k].append(r[i])
        for j in range(m):
            md.add(sum(r_out.get(j, [])) == sum(ends.get((j, n), [])))
            md.add(sum(r_in.get(j, [])) == sum(starts.get((j, 0), [])))
        seg_c = [_ns(c) for c in model.seg_cost]
        hop_c = [_ns(c) for c in model.hop_cost]
        ret_c = [_ns(c) for c in model.ret_cost]
        slack = 2 * m + 2  # worst rounding of a stage sum, in ns
        low = max(0, math.floor(lower * SCALE) - slack)
        if obj == "latency":
            total = sum(c * v for c, v in zip(seg_c, u)) + sum(c * v for c, v in zip(hop_c, h)) + sum(
                c * v for c, v in zip(ret_c, r)
            )
            top = sum(sorted(seg_c)[-m:]) + sum(sorted(hop_c)[-m:]) + max([*ret_c, 0]) + slack
            if np.isfinite(upper):
                top = min(top, _ns(upper) + slack)
            z = md.new_int_var(min(low, top), max(top, 1), "latency")  # the bound sits in the domain
            md.add(z == total)
            md.minimize(z)
        else:
            load = defaultdict(list)
            for i, j in enumerate(J):
                load[j].append(seg_c[i] * u[i])
            for i, (j, _k, _p) in enumerate(model.hop.tolist()):
                load[j].append(hop_c[i] * h[i])
            for i, (j, _k) in enumerate(model.ret.tolist()):
                load[j].append(ret_c[i] * r[i])
            top = max([*seg_c, 0]) + max([*hop_c, 0]) + max([*ret_c, 0]) + slack
            if model.mix:  # the latency term may be the larger
                top = max(top, sum(sorted(seg_c)[-m:]) + sum(sorted(hop_c)[-m:]) + max([*ret_c, 0]) + slack)
            if np.isfinite(upper):
                top = min(top, _ns(upper) + slack)
            t = md.new_int_var(min(low, top), max(top, 1), "bottleneck")
            for j in range(m):
                if load[j]:
                    md.add(t >= sum(load[j]))
            if model.mix:  # mix * T >= every cost (objective max(bottleneck, latency / mix))
                md.add(model.mix * t >= sum(c * v for c, v in zip(seg_c, u)) + sum(c * v for c, v in zip(hop_c, h))
                       + sum(c * v for c, v in zip(ret_c, r)))
            md.minimize(t)
        start = plan_in_model(model, hint_seg) if hint_seg else None
        if start is not None:
            for var, v in zip(u, start["u"]):
                md.add_hint(var, bool(v))
            for var, v in zip(h, start["h"]):
                md.add_hint(var, bool(v))
            for var, v in zip(r, start["r"]):
                md.add_hint(var, bool(v))
        solver = cp_model.CpSolver()
        limit = 0.95 * (deadline - time.perf_counter()) - 0.02
        if limit < 0.05 and hint_seg:  # set-up spent the time: the start plan, no search
            return SolveResult(self.name, "feasible", hint, upper, min(lower, upper), time.perf_counter() - t0,
                               "the time limit was spent building the model: the start plan, not searched further")
        limit = max(0.05, limit)
        solver.parameters.max_time_in_seconds = limit
        solver.parameters.num_workers = opts.get("num_workers", max(1, min(8, os.cpu_count() or 1)))
        solver.parameters.catch_sigint_signal = True
        solver.parameters.absolute_gap_limit = float(2 * slack + 1)  # within rounding of the bound: stop
        solver.parameters.cp_model_presolve = opts.get("presolve", False)  # measured: presolve alone took 7 s on 50 x 8
        s0 = time.perf_counter()
        with hard_stop(deadline, solver.stop_search) as fired:  # max_time is not checked during CP-SAT's load
            code = solver.solve(md)
        wall = time.perf_counter() - s0
        status = STATUS_MAP.get(solver.status_name(code), "unknown")
        elapsed = time.perf_counter() - t0
        interrupted = status in ("feasible", "unknown") and wall < 0.9 * limit and not fired.is_set()
        if status == "infeasible":
            if hint_seg:  # the reductions keep the hint, so this cannot happen; report the hint
                return SolveResult(self.name, "optimal", hint, upper, upper, elapsed, "the start plan is optimal")
            return SolveResult(self.name, "infeasible", None, None, None, elapsed)
        if status not in ("optimal", "feasible"):
            if hint_seg:
                return SolveResult(self.name, "feasible", hint, upper, lower, elapsed,
                                   "CP-SAT found nothing better than the start plan", interrupted=interrupted)
            return SolveResult(self.name, status, None, None, None, elapsed,
                               f"CP-SAT found no plan in {time_limit_s:g} s", interrupted=interrupted)
        chosen = [model.segments()[i] for i, var in enumerate(u) if solver.value(var)]
        plan = plan_from_segments(tables, chosen)
        value = solver.objective_value / SCALE
        bound = value if status == "optimal" else max(lower, solver.best_objective_bound / SCALE)
        if status == "optimal":
            # CP-SAT stops within absolute_gap_limit of its bound; a proof needs the value within rounding
            # of a valid lower bound (CP-SAT's own, or the typed-knapsack bound it was given).
            proof = max(lower, solver.best_objective_bound / SCALE)
            if value - proof > (2 * slack + 1) / SCALE:
                status, bound = "feasible", proof
        note = "interrupted (Ctrl-C): best plan so far" if interrupted else ""
        return SolveResult(self.name, status, plan, value, min(bound, value), elapsed, note, interrupted=interrupted)
