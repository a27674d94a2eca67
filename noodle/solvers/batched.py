"""Continuous batching in the solvers: the batched round, enumerated over the number of stages.

Under ``Workload.streams = C`` a plan of ``S`` stages steps batches of ``b(S) = ceil(C / min(S, C))``
and is worth ``R * unit`` with ``R = max(G * B, L)``, ``G = min(S, C)`` (``B`` the bottleneck and ``L``
the trip of its stage totals at ``b(S)``, see :mod:`noodle.graph.costmodel`) and ``unit = 1 / C`` for
the throughput objective (ms per generated token), ``1`` for latency (a stream gains one token per
round). Stage costs depend on ``S`` through ``b``, so no one table prices every plan; the plans are
split by ``S`` (``K`` the most stages allowed) into *parts*, each a plain problem on its own tables:

* ``S = 1 .. min(C, K)``: ``R = S * B`` (the trip never binds: ``L <= S * B``). Tables at batch ``b(S)``
  with every cost times ``S * unit``, exactly ``S`` stages (``min_stages = max_stages = S``): their
  bottleneck is the plan's value;
* ``S = C+1 .. K`` (only when ``K > C``): ``b = 1`` and ``G = C`` for all of them. Tables at batch 1 times
  ``C * unit``, ``mix = C`` (objective ``max(bottleneck, latency / C)``), at least ``C + 1`` stages;
* ``C = 1``: every ``S`` has ``b = 1`` and ``R = L``: one part, the latency objective at batch 1.

Each part adds only linear rows to the exact models (a stage-count row; with ``mix`` one more), so
``cpsat`` and ``milp`` solve each part exactly and the best plan over the parts is the optimum;
``heuristic`` and ``auto`` search each part (the set DP and its proof cover the pure parts; on a
``mix`` part the plan is proven only when it meets the bound). Time is split evenly over the parts
left. The result is ``optimal`` when every part was solved to optimality (or proven infeasible).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from noodle.errors import InfeasibleError
from noodle.graph.costmodel import CostModel
from noodle.solvers.base import SolveResult, relative_gap
from noodle.solvers.tables import INF, CostTables, build_tables, check_feasible, plan_segments, segments_value
from noodle.types import Problem

__all__ = ["Part", "batched_parts", "part_tables", "solve_batched"]

SolvePart = Callable[[Problem, CostTables, float], SolveResult]


@dataclass(frozen=True)
class Part:
    """Plans of ``min_stages .. max_stages`` stages priced at step batch ``batch`` (see the module doc)."""

    min_stages: int
    max_stages: int
    batch: int
    scale: float  # every time in the tables is multiplied by this
    mix: int  # 0, or C: objective max(bottleneck, latency / C)
    objective: str  # the objective the part is solved with

    @property
    def label(self) -> str:
        s = str(self.min_stages) if self.min_stages == self.max_stages else f"{self.min_stages}-{self.max_stages}"
        return f"{s} stage(s) at batch {self.batch}"


def batched_parts(problem: Problem, num_nodes: int) -> list[Part]:
    """The parts of a batched problem with ``num_nodes`` usable nodes."""
    w = problem.workload
    c = w.streams
    if c is None:
        raise ValueError("batched_parts: the workload has no streams")
    k = min(problem.constraints.max_stages or num_nodes, num_nodes, problem.num_units)
    unit = 1.0 / c if problem.objective == "throughput" else 1.0
    if c == 1:
        return [Part(1, k, 1, unit, 0, "latency")]
    parts = [Part(s, s, w.step_batch(s), s * unit, 0, "throughput") for s in range(1, min(c, k) + 1)]
    if k > c:
        parts.append(Part(c + 1, k, 1, c * unit, c, "throughput"))
    return parts


def part_tables(problem: Problem, cost_model: CostModel, part: Part) -> CostTables:
    """The tables of ``part``: the cost model at the part's batch, scaled, with its stage counts and mix."""
    w = replace(problem.workload, batch_size=part.batch)
    t = build_tables(replace(problem, workload=w), cost_model)
    f = part.scale
    return replace(t, compute=t.compute * f, hop=t.hop * f, ret=t.ret * f,
                   compute_prefix=None if t.compute_prefix is None else t.compute_prefix * f,
                   min_stages=part.min_stages, max_stages=min(part.max_stages, t.max_stages), mix=part.mix)


def solve_batched(problem: Problem, cost_model: CostModel, solve_part: SolvePart,
                  time_limit_s: float) -> tuple[SolveResult, CostTables]:
    """Best plan over the parts (``solve_part`` solves one); also the tables of the whole problem at batch 1
    (for the words of an infeasibility).

    Raises:
        InfeasibleError: a plain violation (memory, pins) that no stage count escapes.
    """
    t0 = time.perf_counter()
    deadline = t0 + time_limit_s
    base = build_tables(replace(problem, workload=replace(problem.workload, batch_size=1)), cost_model)
    check_feasible(problem, base)
    parts = [p for p in batched_parts(problem, len(base.nodes)) if p.min_stages <= base.max_stages]
    best: tuple[float, SolveResult, Part] | None = None
    bounds: list[float | None] = []
    proven, stopped = True, False
    for i, part in enumerate(parts):
        secs = max(0.05, (deadline - time.perf_counter()) / (len(parts) - i))
        tables = part_tables(problem, cost_model, part)
        try:
            check_feasible(problem, tables)
        except InfeasibleError:
            bounds.append(INF)
            continue
        sub = replace(problem, objective=part.objective)
        res = solve_part(sub, tables, secs)
        stopped = stopped or res.interrupted
        if res.status == "infeasible":
            bounds.append(INF)
            continue
        if res.plan is not None:
            val = segments_value(tables, plan_segments(tables, res.plan), part.objective)
            if best is None or val < best[0]:
                best = (val, res, part)
        proven = proven and res.status == "optimal"
        bounds.append(val if res.status == "optimal" and res.plan is not None else res.bound_ms)
        if stopped:
            break
    elapsed = time.perf_counter() - t0
    done = len(bounds) == len(parts)
    if best is None:
        if done and all(b == INF for b in bounds):
            return SolveResult("batched", "infeasible", None, None, None, elapsed), base
        note = "interrupted before any plan was found" if stopped else f"no plan found within {time_limit_s:g} s"
        return SolveResult("batched", "unknown", None, None, None, elapsed, note, interrupted=stopped), base
    val, res, part = best
    known = [b for b in bounds if b is not None]
    bound = min(known) if done and len(known) == len(bounds) else None
    if bound is not None:
        bound = min(bound, val)
    status = "optimal" if done and proven else "feasible" if bound is not None else "heuristic"
    if status == "optimal" and bound is not None and relative_gap(val, bound) > 1e-6:
        status = "feasible"
    how = f"best of {len(parts)} stage-count part(s) ({problem.workload.streams} streams): {part.label}"
    note = f"{res.note}; {how}" if res.note else how
    return replace(res, status=status, objective_ms=val, bound_ms=bound, solve_time_s=elapsed, note=note,
                   interrupted=stopped), base
