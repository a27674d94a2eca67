"""The per-node cost model: each node's own measured unit costs instead of one ``compute_score``.

One ``compute_score`` per node assumes a node speeds up every unit by the same factor; it
does not (a memory-bound ``lm_head`` and compute-bound blocks scale differently on a GPU).
When a node carries a :class:`~noodle.types.NodeProfile` (its own ``noodle profile`` run, or
the cost table a worker measured on itself), :class:`PerNodeCostModel` reads it. For stage
``k`` holding units ``[s_k, e_k)`` on node ``v_k``, ``b`` the workload's batch size::

    c_k = o_v + sum_{i in [s_k, e_k)} d_v(i, b)                    if v_k has a profile
        = sum_{i in [s_k, e_k)} latency_ms(i, b) / compute_score(v_k)  otherwise (the default model)

    o_v = v's step_overhead_ms: the stage runner's fixed work per step on v (0 when not measured),
          paid once per step by the one stage v holds

    d_v(i, b) = v's decode step of unit i at batch size b: interpolated between the batch sizes v measured
                (NodeProfile.decode_latency_ms); with one measured size b0 and a unit that has a batch
                curve (an analytic model's roofline, Unit.curve), d_v(i, b0) * curve_i(b) / curve_i(b0);
                else d_v(i, b0) at any b (flat: optimistic for b > b0)

    a node without a profile prices unit i at latency_ms(i) from its curve at b (Unit.latency_at)

    memory_k = sum_i param_bytes_v(i) + sum_i kv_bytes_per_token_v(i) * context_tokens * batch_size * concurrency

with ``param_bytes_v``/``kv_bytes_per_token_v`` the node profile's figures when it has
them, else the model's. Hops, the token's return, latency and throughput are those of
:class:`~noodle.graph.costmodel.DefaultCostModel` (the model's ``activation_bytes`` over
the link). Sums are differences of per-node prefix sums plus a per-node constant, so the
solvers' tables (:func:`noodle.solvers.tables.build_tables`) are built in numpy with
bit-identical floats; the model is additive (a difference of prefix sums) when no node has
an overhead. Every solver reads the full ``compute[node, start, end]`` table, so a constant
per stage keeps the exact ones exact. A cluster may mix nodes with and without profiles.

:func:`~noodle.graph.costmodel.cost_model_for` picks this model for a problem in which some usable node carries a
profile, else the default model; ``solve``, ``evaluate`` and the plan file use it when no
cost model is given.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from noodle.types import Node, NodeProfile, Problem, Unit

__all__ = ["PerNodeCostModel", "node_prefixes", "node_overhead_ms", "profile_decode_ms"]


def profile_decode_ms(prof: NodeProfile, units: Sequence[Unit], batch: int) -> tuple[float, ...]:
    """``prof``'s decode step per unit at ``batch`` (``d_v(i, b)`` of the module docstring).

    Measured at several batch sizes: interpolated between them. Measured at one size ``b0``: each unit
    with a batch curve scales its figure by ``curve(b) / curve(b0)`` (exactly the measured figure at ``b0``);
    a unit without one keeps its figure at every batch.
    """
    b0 = prof.batch_size
    if prof.decode_ms or batch == b0:
        return prof.decode_latency_ms(batch)
    out = []
    for ms, u in zip(prof.latency_ms, units):
        at_b0 = u.curve.ms(b0) if u.curve is not None else 0.0
        out.append(ms * (u.curve.ms(batch) / at_b0) if u.curve is not None and at_b0 > 0 else ms)
    return tuple(out)


def node_overhead_ms(node: Node) -> float:
    """The fixed cost per step of a stage on ``node``: its profile's ``step_overhead_ms``, 0.0 without a profile."""
    return node.profile.step_overhead_ms if node.profile is not None else 0.0


def node_prefixes(problem: Problem, node: Node) -> tuple[list[float], float, list[int]]:
    """``(compute prefix, divisor, memory prefix)`` of ``node``: compute of ``[s, e)`` is ``(P[e] - P[s]) / divisor``.

    The divisor is 1.0 for a node with a profile (exact: ``x / 1.0 == x``), its ``compute_score`` otherwise.
    """
    w = problem.workload
    per_token = w.context_tokens * w.sequences
    prof: NodeProfile | None = node.profile
    if prof is None:
        lat = [u.latency_at(w.batch_size) for u in problem.units]
        params = [u.param_bytes for u in problem.units]
        kv = [u.kv_bytes_per_token for u in problem.units]
        divisor = node.compute_score
    else:
        lat = list(profile_decode_ms(prof, problem.units, w.batch_size))
        params = list(prof.param_bytes) if prof.param_bytes is not None else [u.param_bytes for u in problem.units]
        kv = list(prof.kv_bytes_per_token) if prof.kv_bytes_per_token is not None \
            else [u.kv_bytes_per_token for u in problem.units]
        divisor = 1.0
    compute = [0.0, *itertools.accumulate(lat)]
    memory = [0, *itertools.accumulate(p + k * per_token for p, k in zip(params, kv))]
    return compute, divisor, memory


class PerNodeCostModel:
    """Each node's own measured unit costs (see the module docstring); the default model elsewhere."""

    name = "per-node"

    def __init__(self) -> None:
        self._key: tuple[object, object] | None = None
        self._cache: dict[str, tuple[Node, tuple[list[float], float, list[int]]]] = {}

    def _prefix(self, problem: Problem, node: Node) -> tuple[list[float], float, list[int]]:
        """Prefix sums per node, cached for the last (units, workload) seen and that very node object."""
        if self._key is None or self._key[0] is not problem.units or self._key[1] != problem.workload:
            self._key, self._cache = (problem.units, problem.workload), {}
        hit = self._cache.get(node.id)
        if hit is None or hit[0] is not node:
            hit = self._cache[node.id] = (node, node_prefixes(problem, node))
        return hit[1]

    def stage_compute_ms(self, problem: Problem, node: Node, start: int, end: int) -> float:
        compute, divisor, _ = self._prefix(problem, node)
        return (compute[end] - compute[start]) / divisor + node_overhead_ms(node)

    def stage_memory_bytes(self, problem: Problem, node: Node, start: int, end: int) -> int:
        _, _, memory = self._prefix(problem, node)
        return memory[end] - memory[start]

    def hop_ms(self, problem: Problem, src: Node, dst: Node, cut: int) -> float:
        nbytes = problem.units[cut - 1].activation_bytes * problem.workload.hop_rows  # a batched step's rows
        return problem.cluster.link(src.id, dst.id).transfer_ms(nbytes)

    def return_ms(self, problem: Problem, last: Node, first: Node) -> float:
        return problem.cluster.link(last.id, first.id).latency_ms
