"""Exact joint placement with CP-SAT (OR-Tools).

Model (the sharing model and ``U`` are :mod:`noodle.solvers.joint.model`'s). Per model ``m``, a boolean
``u[m, j, s, e]`` for every allowed stage (units ``[s, e)`` on node ``j``, finite in its tables), and::

    sum_{s = 0} u[m] = 1,  sum_{e = n_m} u[m] = 1                  one first and one last stage
    sum_{e = p} u[m] = sum_{s = p} u[m]            (0 < p < n_m)    a contiguous chain
    sum_{s, e} u[m, j, s, e] <= 1                   (every j)        one stage of m per node
    sum u[m] <= max_stages_m
    h[m, j, k, p] >= end[m, j, p] + start[m, k, p] - 1   (j != k)  hand-over j -> k at cut p
    r[m, j, k]    >= end[m, j, n_m] + start[m, k, 0] - 1 (j != k)  token return
    sum_m sum_{s, e} memory_m[j, s, e] * u[m, j, s, e] <= memory_j  (every j)   shared memory
    T >= sum_m a_m * (sum compute_m * u[m, j] + sum hop_m * h[m, j] + sum ret_m * r[m, j])   (every j)
    minimise T

with ``end[m, j, p]`` (``start``) the sum of ``u[m, j, ., p]`` (``u[m, j, p, .]``). Costs are integers:
``a_m / max a`` times nanoseconds; the plan is re-priced in floating point afterwards, and a proof holds
within that rounding (``slack``). The heuristic's plan is the hint.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict

import numpy as np

from noodle.solvers.joint.model import JointTables, Segments, fits, joint_value
from noodle.solvers.exact.cpsat import STATUS_MAP

__all__ = ["solve_cpsat", "MAX_VARIABLES", "STATUS_MAP"]

SCALE = 1_000_000  # integer units per ms
MAX_VARIABLES = 200_000  # above this the model is not built (the heuristic's plan stands)


def solve_cpsat(jt: JointTables, *, time_limit_s: float, hint: list[Segments] | None = None,
                num_workers: int | None = None) -> tuple[str, list[Segments] | None, float | None, str]:
    """``(status, plans, lower bound on U in ms, note)``; status one of optimal, feasible, infeasible, unknown."""
    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    md = cp_model.CpModel()
    top = max(jt.coef)
    rel = [a / top for a in jt.coef]
    segs: list[list[tuple[int, int, int]]] = []
    us: list[list] = []
    load: dict[int, list] = defaultdict(list)
    mem: dict[int, list] = defaultdict(list)
    terms = 0
    count = sum(int(np.isfinite(t.compute).sum()) + len(t.nodes) ** 2 * t.n for t in jt.tables)
    if count > MAX_VARIABLES:
        return "unknown", None, None, f"{count} variables, over {MAX_VARIABLES}: not built"
    for mi, (t, a) in enumerate(zip(jt.tables, rel)):
        n, mm = t.n, len(t.nodes)
        seg = t.segments()
        u = [md.new_bool_var(f"u{mi}_{i}") for i in range(len(seg))]
        segs.append(seg)
        us.append(u)
        ends, starts, by_node = defaultdict(list), defaultdict(list), defaultdict(list)
        for var, (j, s, e) in zip(u, seg):
            ends[j, e].append(var)
            starts[j, s].append(var)
            by_node[j].append(var)
            load[j].append(_int(a * t.compute[j, s, e]) * var)
            mem[j].append(int(t.memory[j, s, e]) * var)
            terms += 1
        md.add_exactly_one([v for v, (_j, s, _e) in zip(u, seg) if s == 0])
        md.add_exactly_one([v for v, (_j, _s, e) in zip(u, seg) if e == n])
        for p in range(1, n):
            md.add(sum(v for j in range(mm) for v in ends[j, p]) == sum(v for j in range(mm) for v in starts[j, p]))
        for j in range(mm):
            md.add_at_most_one(by_node[j])
        if t.max_stages < mm:
            md.add(sum(u) <= t.max_stages)
        for j in range(mm):
            for k in range(mm):
                if j == k:
                    continue
                for p in range(1, n):
                    c = _int(a * t.hop[j, k, p])
                    if c and ends[j, p] and starts[k, p]:
                        h = md.new_bool_var(f"h{mi}_{j}_{k}_{p}")
                        md.add(h >= sum(ends[j, p]) + sum(starts[k, p]) - 1)
                        load[j].append(c * h)
                c = _int(a * t.ret[j, k])
                if c and ends[j, n] and starts[k, 0]:
                    r = md.new_bool_var(f"r{mi}_{j}_{k}")
                    md.add(r >= sum(ends[j, n]) + sum(starts[k, 0]) - 1)
                    load[j].append(c * r)
    for j, cap in enumerate(jt.capacity):
        if mem[j]:
            md.add(sum(mem[j]) <= cap)
    ub = sum(_int(a * float(np.nanmax(np.where(np.isfinite(t.compute), t.compute, 0.0)))) for t, a in zip(jt.tables, rel))
    ub += sum(_int(a * (float(t.hop.max()) + float(t.ret.max()))) for t, a in zip(jt.tables, rel))
    big = md.new_int_var(0, max(1, ub), "T")
    for j in load:
        md.add(big >= sum(load[j]))
    md.minimize(big)
    if hint is not None:
        for seg, u, h_segs in zip(segs, us, hint):
            chosen = set(h_segs)
            for var, sg in zip(u, seg):
                md.add_hint(var, sg in chosen)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.05, time_limit_s - (time.perf_counter() - t0))
    solver.parameters.num_workers = num_workers or max(1, min(8, os.cpu_count() or 1))
    slack = len(jt.tables) * 3 + 2  # worst rounding of one node's sum, in integer units
    solver.parameters.absolute_gap_limit = float(slack)
    code = solver.solve(md)
    status = STATUS_MAP.get(solver.status_name(code), "unknown")
    if status == "infeasible":
        return "infeasible", None, None, "no placement of all models fits the nodes' memory"
    if status not in ("optimal", "feasible"):
        return "unknown", None, None, f"CP-SAT found no plan in {time_limit_s:g} s"
    plans = [[sg for var, sg in zip(u, seg) if solver.value(var)] for seg, u in zip(segs, us)]
    if fits(jt, plans) is not None:  # cannot happen: the memory rows are exact integers
        return "unknown", None, None, "CP-SAT's plan is over memory"
    bound_int = solver.best_objective_bound
    lower = max(0.0, (math.floor(bound_int) - slack) / SCALE * top)
    value = joint_value(jt, plans)
    if status == "optimal" and value - lower > 2 * (slack + 1) / SCALE * top + 1e-9 * value:
        status = "feasible"
    return status, plans, value if status == "optimal" else min(lower, value), ""  # optimal: within rounding


def _int(ms: float) -> int:
    return int(round(ms * SCALE))
