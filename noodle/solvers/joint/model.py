"""Several models on shared nodes: the sharing model, the objective, and the tables every joint solver reads.

Models ``m = 1..M``, usable nodes ``j``. Each model has its own pipeline: a contiguous split of its unit
chain into stages, at most one stage per node (as a single model's plan); stages of *different* models may
share a node. Per model, :func:`~noodle.solvers.tables.build_tables` prices every stage as if alone:
``t_m(k) = compute_m[j, s, e] + out_m`` (its step plus handing its output on, the single-model bottleneck
term of :mod:`noodle.graph.costmodel`), at the model's ``batch_size`` (``b_m`` tokens per step).

**Sharing (time slicing).** A node runs one stage step at a time, of whichever model. Model ``m`` gets
``x_m`` tokens/s when each of its stages steps ``x_m / b_m`` times per second, so node ``j`` is busy::

    busy_j = sum over the stages k placed on j of  (x_m(k) / b_m(k)) * t_m(k) / 1000   <= 1

A stage's step is stretched by what the other models place on its node: a node's time per round is the
sum of the steps of every stage it holds (each model's step repeated ``w_m / b_m`` times per round).

**Objective.** Each model has a weight ``w_m`` (a share) or a required rate ``R_m`` (then ``w_m = R_m``).
Weighted max-min: maximise ``lambda = min_m x_m / w_m``. At the optimum every ``x_m = lambda * w_m``
(slowing the others frees nodes), so with ``a_m = w_m / b_m``::

    U = max_j  sum over stages k on j of  a_m(k) * t_m(k)        (ms per round: model m gains w_m tokens)
    lambda = 1000 / U,   x_m = 1000 * w_m / U   tokens/s

and the solvers minimise ``U`` (a bottleneck, linear in the placement). With required rates, the plan
meets every ``R_m`` iff ``U <= 1000`` ms (``U / 1000`` is the busiest node's utilisation); minimising ``U``
leaves the most headroom. Memory: a node holds all its stages, ``sum_k memory_m(k) <= memory of j``.

Not modelled: a pipeline with fewer groups in flight than stages is latency-bound (as the single-model
``throughput`` objective, this prices saturated pipelines); continuous batching (``streams``) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from noodle.errors import InfeasibleError
from noodle.graph.costmodel import cost_model_for
from noodle.joint import JointPlan, JointProblem
from noodle.solvers.tables import CostTables, build_tables, check_feasible, plan_segments
from noodle.types import GIB, Plan

__all__ = ["JointTables", "Segments", "build_joint_tables", "stage_loads", "joint_value", "node_loads",
           "fits", "joint_plan", "plan_as_segments", "tokens_per_s"]

Segments = list[tuple[int, int, int]]  # one model's (node index, start, end), in chain order


@dataclass(frozen=True)
class JointTables:
    """Per model its single-model tables (same node order) and its coefficient ``a_m = w_m / b_m``."""

    tables: tuple[CostTables, ...]
    coef: tuple[float, ...]

    @property
    def num_nodes(self) -> int:
        return len(self.tables[0].nodes)

    @property
    def capacity(self) -> list[int]:
        return [nd.memory_bytes for nd in self.tables[0].nodes]


def build_joint_tables(jp: JointProblem) -> JointTables:
    """Every model's cost tables on the shared nodes.

    Raises:
        InfeasibleError: a model that fits on the cluster by no means even alone (its words name the model).
    """
    out = []
    for m in jp.models:
        p = m.problem
        t = build_tables(replace(p, workload=p.workload.at_stages(1)), cost_model_for(p))
        try:
            check_feasible(p, t)
        except InfeasibleError as exc:
            raise InfeasibleError(f"model {m.name}: {exc}") from None
        out.append(t)
    return JointTables(tuple(out), tuple(m.weight / m.tokens_per_step for m in jp.models))


def stage_loads(t: CostTables, segs: Segments) -> list[tuple[int, float]]:
    """``(node index, step + out)`` of each stage of one model's plan (the single-model stage totals)."""
    segs = sorted(segs, key=lambda x: x[1])
    out = []
    for i, (j, s, e) in enumerate(segs):
        if i + 1 < len(segs):
            hand = float(t.hop[j, segs[i + 1][0], e])
        else:
            hand = float(t.ret[j, segs[0][0]]) if len(segs) > 1 else 0.0
        out.append((j, float(t.compute[j, s, e]) + hand))
    return out


def node_loads(jt: JointTables, plans: list[Segments]) -> np.ndarray:
    """``sum_m a_m * t_m(k)`` per node: its ms per round."""
    load = np.zeros(jt.num_nodes)
    for t, a, segs in zip(jt.tables, jt.coef, plans):
        for j, ms in stage_loads(t, segs):
            load[j] += a * ms
    return load


def joint_value(jt: JointTables, plans: list[Segments]) -> float:
    """The objective ``U`` (ms per round, see the module doc)."""
    return float(node_loads(jt, plans).max())


def fits(jt: JointTables, plans: list[Segments]) -> str | None:
    """None when every node holds its stages of all models; else words naming the node and the numbers."""
    used = np.zeros(jt.num_nodes, dtype=np.int64)
    for t, segs in zip(jt.tables, plans):
        for j, s, e in segs:
            used[j] += int(t.memory[j, s, e])
    for j, cap in enumerate(jt.capacity):
        if used[j] > cap:
            return (f"node {jt.tables[0].nodes[j].id} holds {used[j] / GIB:.2f} GiB of stages, "
                    f"it has {cap / GIB:.2f} GiB")
    return None


def joint_plan(jt: JointTables, plans: list[Segments]) -> JointPlan:
    """Segments per model as a :class:`JointPlan`."""
    out = []
    for t, segs in zip(jt.tables, plans):
        segs = sorted(segs, key=lambda x: x[1])
        out.append(Plan.from_cuts([t.nodes[j].id for j, _, _ in segs], [0, *(e for _, _, e in segs)]))
    return JointPlan(tuple(out))


def plan_as_segments(jt: JointTables, plan: JointPlan) -> list[Segments]:
    """A joint plan back as segments per model."""
    return [plan_segments(t, p) for t, p in zip(jt.tables, plan.plans)]


def tokens_per_s(jp: JointProblem, value_ms: float) -> list[float]:
    """Each model's tokens/s at the objective ``U``: ``1000 * w_m / U``."""
    return [1e3 * m.weight / value_ms if value_ms > 0 else float("inf") for m in jp.models]

