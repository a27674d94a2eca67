"""The cost model: what a stage, a hop and a plan cost.

The default model (:class:`DefaultCostModel`) is, for stages ``k = 1..S`` in
pipeline order, stage ``k`` holding units ``[s_k, e_k)`` on node ``v_k``::

    c_k   = sum(latency_ms of its units at batch b) / compute_score(v_k)  # compute, b = batch_size
    h_k   = link(v_k, v_k+1).latency_ms
            + activation_bytes(unit e_k - 1) * 8 / (bandwidth_gbps * 1e9) * 1e3   # hop, k < S
    r     = link(v_S, v_1).latency_ms if S >= 2 else 0                   # token returns
    out_k = h_k for k < S, r for k = S
    latency    = sum_k c_k + sum_{k<S} h_k + r          (ms per decoded token)
    throughput = max_k (c_k + out_k)                      (bottleneck, ms)
    memory_k   = sum(param_bytes) + sum(kv_bytes_per_token) * context_tokens * batch_size * concurrency
                 <= memory_gb(v_k) * 2**30

Continuous batching (``Workload.streams = C``, the serving engine of
:mod:`noodle.executors.batching`). A plan of ``S`` stages runs ``G = min(S, C)`` batches of
``b = ceil(C / G)`` sequences; every stage steps one whole batch per forward. Each term above is
priced at the batch a stage steps: ``c_k(b)`` from the node's per-unit ``decode_ms`` at ``b``
(interpolated, :meth:`~noodle.types.NodeProfile.decode_latency_ms`), or from the unit's batch curve where
the node has none measured (an analytic model's roofline, :class:`~noodle.types.BatchCurve`: the weights
read once per step, each sequence's FLOPs and KV reads on top; a node profiled at one batch size scales its
figures along it; see :mod:`noodle.profile.pernode`). Only a unit with neither (a ``layers`` or ``profile``
model on a node measured at one batch) costs the same at any ``b``. Hops carry ``b`` rows of activations
(``activation_bytes * b``), memory holds all ``C`` sequences' KV on every stage. With
``t_k = c_k(b) + out_k(b)``::

    round   R = max(G * max_k t_k, sum_k t_k)          (ms in which every stream gains one token)
    throughput = C / R tokens per ms;  objective_ms = R / C (ms per generated token)
    latency objective: objective_ms = R (a stream's time per token: it gains one token per round)

Why: each sequence gains one token per round, since a batch must return from the last stage
(its tokens sampled) before its next step enters the first. One batch's trip is ``sum_k t_k``
(a batch is at one stage at a time), so ``R >= sum_k t_k``; every stage steps all ``G`` batches
once per round, one at a time, so ``R >= G * t_k`` for each ``k``. A closed cyclic line with
deterministic times and ``G`` batches reaches that bound (throughput ``min(G / L, 1 / B)``
batches per ms, ``L`` the trip, ``B`` the bottleneck). For ``S <= C`` the trip never binds
(``sum_k t_k <= S * max_k t_k``), so ``R = S * max_k t_k``; for ``S > C`` (fewer streams than
stages) the ``C`` single-sequence batches leave stages idle and ``R = max(C * B, L)``. Batches
of ``floor(C / G)`` (when ``G`` does not divide ``C``) are priced at ``b`` too: a bound from above.

Any object with the four methods of :class:`CostModel` can replace it; exact
solvers precompute every (node, range) cost from it, so a custom model needs no
special structure (see ``examples/custom_cost_model.py``). Nodes that carry their own
measured unit costs (``Node.profile``) are priced by
:class:`~noodle.profile.pernode.PerNodeCostModel`; :func:`cost_model_for` picks it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from noodle.profile.pernode import PerNodeCostModel
from noodle.types import Node, Plan, Problem

__all__ = ["CostModel", "DefaultCostModel", "PerNodeCostModel", "StageCost", "Evaluation", "evaluate",
           "cost_model_for", "pipeline_tokens_per_s", "batched_round_ms"]


@runtime_checkable
class CostModel(Protocol):
    """What the planner needs to know about costs. All times in ms, memory in bytes."""

    name: str

    def stage_compute_ms(self, problem: Problem, node: Node, start: int, end: int) -> float:
        """Compute time per decoded token of units ``[start, end)`` on ``node``."""
        ...

    def stage_memory_bytes(self, problem: Problem, node: Node, start: int, end: int) -> int:
        """Memory that units ``[start, end)`` need on ``node`` for the workload."""
        ...

    def hop_ms(self, problem: Problem, src: Node, dst: Node, cut: int) -> float:
        """Time to hand the output of unit ``cut - 1`` from ``src`` to ``dst``."""
        ...

    def return_ms(self, problem: Problem, last: Node, first: Node) -> float:
        """Time for the sampled token to travel from the last stage back to the first."""
        ...


class DefaultCostModel:
    """The documented default: additive compute and memory, link latency + bandwidth hops."""

    name = "default"

    def __init__(self) -> None:
        self._cached: tuple[object, object] | None = None
        self._lat: list[float] = []
        self._mem: list[int] = []

    def _prefix(self, problem: Problem) -> None:
        """Prefix sums over the unit chain, cached for the last problem seen."""
        if self._cached is not None and self._cached[0] is problem.units and self._cached[1] == problem.workload:
            return
        per_token = problem.workload.context_tokens * problem.workload.sequences
        b = problem.workload.batch_size
        self._lat = [0.0, *itertools.accumulate(u.latency_at(b) for u in problem.units)]
        self._mem = [0, *itertools.accumulate(u.param_bytes + u.kv_bytes_per_token * per_token for u in problem.units)]
        self._cached = (problem.units, problem.workload)

    def stage_compute_ms(self, problem: Problem, node: Node, start: int, end: int) -> float:
        self._prefix(problem)
        return (self._lat[end] - self._lat[start]) / node.compute_score

    def stage_memory_bytes(self, problem: Problem, node: Node, start: int, end: int) -> int:
        self._prefix(problem)
        return self._mem[end] - self._mem[start]

    def hop_ms(self, problem: Problem, src: Node, dst: Node, cut: int) -> float:
        nbytes = problem.units[cut - 1].activation_bytes * problem.workload.hop_rows  # a batched step's rows
        return problem.cluster.link(src.id, dst.id).transfer_ms(nbytes)

    def return_ms(self, problem: Problem, last: Node, first: Node) -> float:
        return problem.cluster.link(last.id, first.id).latency_ms


def cost_model_for(problem: Problem) -> CostModel:
    """The model a problem is priced with when none is given.

    :class:`~noodle.graph.formats.FormatCostModel` when the problem lets the planner choose weight formats,
    :class:`~noodle.profile.pernode.PerNodeCostModel` when some usable node carries its own profile, else :class:`DefaultCostModel` (the two agree on nodes without a profile).
    """
    if problem.formats is not None:
        from noodle.graph.formats import FormatCostModel  # formats builds on pernode, as this module does

        return FormatCostModel()
    if any(n.profile is not None for n in problem.usable_nodes()):
        return PerNodeCostModel()
    return DefaultCostModel()


@dataclass(frozen=True)
class StageCost:
    """Costs of one stage of a plan under a cost model."""

    node: str
    start: int
    end: int
    compute_ms: float
    out_ms: float  # hop to the next stage, or the token's return for the last one
    memory_bytes: int
    memory_capacity_bytes: int

    @property
    def total_ms(self) -> float:
        return self.compute_ms + self.out_ms


@dataclass(frozen=True)
class Evaluation:
    """A plan re-evaluated under a cost model.

    ``streams`` is set under continuous batching (then ``round_ms`` is the round of the module
    docstring, the stage costs are priced at ``step_batch``, and ``groups`` batches circulate).
    """

    stages: tuple[StageCost, ...]
    token_latency_ms: float
    bottleneck_ms: float
    objective: str
    streams: int | None = None
    groups: int = 1
    step_batch: int = 1

    @property
    def round_ms(self) -> float:
        """Batched: ``max(G * bottleneck, trip)``, the time in which every stream gains one token."""
        return max(self.groups * self.bottleneck_ms, self.token_latency_ms)

    @property
    def objective_ms(self) -> float:
        if self.streams is not None:
            return self.round_ms / self.streams if self.objective == "throughput" else self.round_ms
        return self.bottleneck_ms if self.objective == "throughput" else self.token_latency_ms

    @property
    def tokens_per_s(self) -> float:
        """Steady-state tokens/s of a full pipeline (throughput) or of one sequence (latency)."""
        if self.streams is not None:
            ms = self.round_ms / (self.streams if self.objective == "throughput" else 1)
        else:
            ms = self.bottleneck_ms if self.objective == "throughput" else self.token_latency_ms
        return 1e3 / ms if ms > 0 else float("inf")


def batched_round_ms(totals: list[float], streams: int) -> float:
    """The batched round of stage totals ``t_k`` (compute + out) with ``C = streams``: ``max(G max t, sum t)``."""
    if not totals:
        return 0.0
    return max(min(len(totals), streams) * max(totals), sum(totals))


def pipeline_tokens_per_s(token_latency_ms: float, bottleneck_ms: float, concurrency: int, batch_size: int = 1) -> float:
    """Tokens/s of a pipeline with ``concurrency`` groups of ``batch_size`` sequences in flight.

    One group completes a step every ``token_latency_ms`` (a trip round every stage); the
    busiest stage admits a group step every ``bottleneck_ms``: ``b * min(G / L, 1 / B)``.
    """
    if token_latency_ms <= 0 or bottleneck_ms <= 0:
        return 0.0
    return batch_size * min(concurrency / token_latency_ms, 1.0 / bottleneck_ms) * 1e3


def evaluate(problem: Problem, plan: Plan, cost_model: CostModel | None = None) -> Evaluation:
    """Cost of ``plan`` for ``problem`` under ``cost_model`` (default: :func:`cost_model_for` the problem)."""
    cm = cost_model or cost_model_for(problem)
    w = problem.workload
    if w.batched:  # every term at the batch a stage of this plan steps
        problem = replace(problem, workload=w.at_stages(len(plan.stages)))
    nodes = [problem.cluster.node(s.node) for s in plan.stages]
    stages: list[StageCost] = []
    for k, (stage, node) in enumerate(zip(plan.stages, nodes)):
        if k + 1 < len(nodes):
            out = cm.hop_ms(problem, node, nodes[k + 1], stage.end)
        elif len(nodes) >= 2:
            out = cm.return_ms(problem, node, nodes[0])
        else:
            out = 0.0
        stages.append(
            StageCost(
                node=stage.node,
                start=stage.start,
                end=stage.end,
                compute_ms=cm.stage_compute_ms(problem, node, stage.start, stage.end),
                out_ms=out,
                memory_bytes=cm.stage_memory_bytes(problem, node, stage.start, stage.end),
                memory_capacity_bytes=node.memory_bytes,
            )
        )
    latency = sum(s.total_ms for s in stages)
    bottleneck = max((s.total_ms for s in stages), default=0.0)
    if not w.batched:
        return Evaluation(tuple(stages), latency, bottleneck, problem.objective)
    k = len(plan.stages)
    return Evaluation(tuple(stages), latency, bottleneck, problem.objective, streams=w.streams, groups=w.groups(k),
                      step_batch=w.step_batch(k))
