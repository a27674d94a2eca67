"""Every cost a solver may need, precomputed once from a Problem and a CostModel.

Solvers never call the cost model themselves: they read these arrays, so any
cost model (additive or not) is solved exactly. ``INF`` marks a segment that may
not exist (over memory, or against a pin).

For :class:`~noodle.graph.costmodel.DefaultCostModel` and
:class:`~noodle.profile.pernode.PerNodeCostModel` (exactly those classes, not subclasses)
the tables are built with numpy from (per-node) prefix sums, in the same floating-point
operations as the model's own methods, so the arrays are identical to the generic
loop (``tests/solvers/test_tables.py`` and ``tests/profile/test_pernode.py`` check it); any
other cost model is called once per (node, range), hop and return.

Structure the solvers may exploit is recorded, never assumed:

* ``compute_prefix``/``memory_prefix`` are set when every allowed segment's cost is
  the difference of per-node prefix sums (an *additive* model, e.g. the default); for
  other cost models build_tables checks additivity numerically and leaves them ``None``
  when it does not hold;
* :meth:`CostTables.flat_hops` gives ``hop[j, k]`` when a hop does not depend on the
  cut position.
"""

from __future__ import annotations

from dataclasses import dataclass

import itertools

import numpy as np

from noodle.errors import InfeasibleError, SpecError
from noodle.graph.costmodel import CostModel, DefaultCostModel
from noodle.profile.pernode import PerNodeCostModel, node_overhead_ms, node_prefixes
from noodle.sizes import size_problem
from noodle.types import GIB, Node, Plan, Problem

__all__ = [
    "INF", "CostTables", "build_tables", "check_feasible", "explain_infeasible", "segments_value", "plan_segments",
]

INF = float("inf")


@dataclass(frozen=True)
class CostTables:
    """Costs indexed by usable-node position ``j`` and unit positions.

    Attributes:
        nodes: usable nodes (excluded ones dropped), ``nodes[j]``.
        n: number of units.
        compute: ``compute[j, s, e]`` ms of units ``[s, e)`` on node j; INF where not allowed.
        memory: ``memory[j, s, e]`` bytes of units ``[s, e)`` on node j.
        hop: ``hop[j, k, p]`` ms to hand unit p-1's output from node j to node k (p in 1..n-1).
        ret: ``ret[j, k]`` ms for the token to return from last node j to first node k (0 on the diagonal).
        max_stages: cap on the number of stages (the number of usable nodes when unset).
        compute_prefix: ``P[j, i]`` with ``compute[j, s, e] == P[j, e] - P[j, s]`` (up to rounding) on every
            allowed segment, when the cost model is additive; else None.
        memory_prefix: ``M[j, i]`` with ``memory[j, s, e] == M[j, e] - M[j, s]`` exactly, when additive; else None.
        min_stages: plans have at least this many stages (a part of a batched problem, :mod:`.batched`).
        mix: 0, or ``C``: the throughput objective is then ``max(bottleneck, sum of stage totals / C)``
            (a batched part with more stages than streams, :mod:`.batched`).
    """

    nodes: tuple[Node, ...]
    n: int
    compute: np.ndarray
    memory: np.ndarray
    hop: np.ndarray
    ret: np.ndarray
    max_stages: int
    compute_prefix: np.ndarray | None = None
    memory_prefix: np.ndarray | None = None
    min_stages: int = 1
    mix: int = 0

    @property
    def additive(self) -> bool:
        return self.compute_prefix is not None and self.memory_prefix is not None

    def flat_hops(self) -> np.ndarray | None:
        """``H[j, k]`` when every hop ``hop[j, k, p]`` (0 < p < n) is the same for all p; else None."""
        if self.n < 2:
            return np.zeros((len(self.nodes), len(self.nodes)))
        inner = self.hop[:, :, 1 : self.n]
        if np.all(inner == inner[:, :, :1]):
            return inner[:, :, 0].copy()
        return None

    def segments(self) -> list[tuple[int, int, int]]:
        """All allowed (j, s, e), i.e. where compute is finite."""
        j, s, e = np.nonzero(np.isfinite(self.compute))
        return list(zip(j.tolist(), s.tolist(), e.tolist()))


def build_tables(problem: Problem, cost_model: CostModel) -> CostTables:
    """Evaluate the cost model on every (node, range), hop and return edge.

    Raises:
        SpecError: the problem is past the limits of :mod:`noodle.sizes` (checked before allocating).
    """
    too_big = size_problem(problem.num_units, len(problem.usable_nodes()))
    if too_big:
        raise SpecError(f"problem {problem.name!r}: {too_big} (see noodle/sizes.py)")
    if type(cost_model) is DefaultCostModel:
        return _build_default(problem)
    if type(cost_model) is PerNodeCostModel:
        return _build_per_node(problem)
    return _build_generic(problem, cost_model)


def _allowed(problem: Problem, nodes: tuple[Node, ...], memory: np.ndarray) -> np.ndarray:
    """``allowed[j, s, e]``: s < e, within memory, and consistent with the pins."""
    n = problem.num_units
    s_idx = np.arange(n + 1)[:, None]
    e_idx = np.arange(n + 1)[None, :]
    ok = np.broadcast_to(s_idx < e_idx, memory.shape).copy()
    for j, node in enumerate(nodes):
        ok[j] &= memory[j] <= node.memory_bytes
        for pin in problem.constraints.pins:
            if pin.node == node.id:
                ok[j] &= (s_idx <= pin.start) & (e_idx >= pin.end)
            else:
                ok[j] &= ~((s_idx < pin.end) & (e_idx > pin.start))
    return ok


def _build_default(problem: Problem) -> CostTables:
    """The default model in numpy: the same float operations as its methods, in bulk."""
    nodes = tuple(problem.usable_nodes())
    n, m = problem.num_units, len(nodes)
    per_token = problem.workload.context_tokens * problem.workload.sequences
    b = problem.workload.batch_size
    lat = np.array([0.0, *itertools.accumulate(u.latency_at(b) for u in problem.units)])
    mem = np.array(
        [0, *itertools.accumulate(u.param_bytes + u.kv_bytes_per_token * per_token for u in problem.units)],
        dtype=np.int64,
    )
    seg_lat = lat[None, :] - lat[:, None]  # [s, e] = lat[e] - lat[s]
    seg_mem = mem[None, :] - mem[:, None]
    memory = np.zeros((m, n + 1, n + 1), dtype=np.int64)
    upper = np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)
    memory[:, upper] = seg_mem[upper]
    ok = _allowed(problem, nodes, memory)
    scores = np.array([nd.compute_score for nd in nodes], dtype=float)
    compute = np.where(ok, seg_lat[None] / scores[:, None, None], INF)
    hop, ret = _link_tables(problem, nodes)
    cap = problem.constraints.max_stages or m
    return CostTables(
        nodes, n, compute, memory, hop, ret, min(cap, m),
        compute_prefix=lat[None, :] / scores[:, None],
        memory_prefix=np.broadcast_to(mem, (m, n + 1)).copy(),
    )


def _link_tables(problem: Problem, nodes: tuple[Node, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Hops and returns of the default model (link latency + the model's activation bytes over its bandwidth)."""
    n, m = problem.num_units, len(nodes)
    rows = problem.workload.hop_rows
    act = np.array([0.0, *(float(u.activation_bytes * rows) for u in problem.units)])  # act[p] = unit p-1's bytes
    hop = np.zeros((m, m, n + 1))
    ret = np.zeros((m, m))
    for j, a in enumerate(nodes):
        for k, b in enumerate(nodes):
            if j != k:
                link = problem.cluster.link(a.id, b.id)
                ret[j, k] = link.latency_ms
                if n > 1:
                    hop[j, k, 1:n] = link.latency_ms + act[1:n] * 8.0 / (link.bandwidth_gbps * 1e9) * 1e3
    return hop, ret


def _build_per_node(problem: Problem) -> CostTables:
    """:class:`PerNodeCostModel` in numpy: per-node prefix sums (+ the node's step overhead), the same float
    operations as its methods; additive (prefixes set) only when no node has an overhead."""
    nodes = tuple(problem.usable_nodes())
    n, m = problem.num_units, len(nodes)
    rows = [node_prefixes(problem, nd) for nd in nodes]
    lat = np.array([r[0] for r in rows], dtype=float).reshape(m, n + 1)
    divisor = np.array([r[1] for r in rows], dtype=float)
    mem = np.array([r[2] for r in rows], dtype=np.int64).reshape(m, n + 1)
    upper = np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)
    memory = mem[:, None, :] - mem[:, :, None]  # [j, s, e] = mem[j, e] - mem[j, s]
    memory[:, ~upper] = 0
    ok = _allowed(problem, nodes, memory)
    compute = lat[:, None, :] - lat[:, :, None]
    compute /= divisor[:, None, None]
    overhead = np.array([node_overhead_ms(nd) for nd in nodes], dtype=float)
    compute += overhead[:, None, None]
    compute[~ok] = INF
    hop, ret = _link_tables(problem, nodes)
    cap = problem.constraints.max_stages or m
    additive = not np.any(overhead)
    return CostTables(nodes, n, compute, memory, hop, ret, min(cap, m),
                      compute_prefix=lat / divisor[:, None] if additive else None,
                      memory_prefix=mem if additive else None)


def _build_generic(problem: Problem, cost_model: CostModel) -> CostTables:
    nodes = tuple(problem.usable_nodes())
    n, m = problem.num_units, len(nodes)
    compute = np.full((m, n + 1, n + 1), INF)
    memory = np.zeros((m, n + 1, n + 1), dtype=np.int64)
    pins = problem.constraints.pins
    for j, node in enumerate(nodes):
        mine = [p for p in pins if p.node == node.id]
        others = [p for p in pins if p.node != node.id]
        for s in range(n):
            for e in range(s + 1, n + 1):
                mem = cost_model.stage_memory_bytes(problem, node, s, e)
                memory[j, s, e] = mem
                if mem > node.memory_bytes:
                    continue
                if any(not (s <= p.start and p.end <= e) for p in mine):
                    continue
                if any(p.start < e and s < p.end for p in others):
                    continue
                compute[j, s, e] = cost_model.stage_compute_ms(problem, node, s, e)
    hop = np.zeros((m, m, n + 1))
    ret = np.zeros((m, m))
    for j, a in enumerate(nodes):
        for k, b in enumerate(nodes):
            if j != k:
                ret[j, k] = cost_model.return_ms(problem, a, b)
                for p in range(1, n):
                    hop[j, k, p] = cost_model.hop_ms(problem, a, b, p)
    cap = problem.constraints.max_stages or m
    cpre, mpre = _additive_prefixes(problem, cost_model, nodes, compute, memory)
    return CostTables(nodes, n, compute, memory, hop, ret, min(cap, m), compute_prefix=cpre, memory_prefix=mpre)


def _additive_prefixes(
    problem: Problem, cost_model: CostModel, nodes: tuple[Node, ...], compute: np.ndarray, memory: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-node prefix sums when the model is additive on every allowed segment (checked), else (None, None)."""
    n, m = problem.num_units, len(nodes)
    if n == 0 or m == 0:
        return None, None
    unit_c = np.array([[cost_model.stage_compute_ms(problem, nd, i, i + 1) for i in range(n)] for nd in nodes])
    if not np.all(np.isfinite(unit_c)) or np.any(unit_c < 0):
        return None, None
    cpre = np.concatenate([np.zeros((m, 1)), np.cumsum(unit_c, axis=1)], axis=1)
    mpre = np.concatenate([np.zeros((m, 1), dtype=np.int64), np.cumsum(memory[:, np.arange(n), np.arange(n) + 1], axis=1)],
                          axis=1)
    upper = np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)
    mem_sum = mpre[:, None, :] - mpre[:, :, None]
    if not np.array_equal(memory[:, upper], mem_sum[:, upper]) or np.any(memory[:, upper] < 0):
        return None, None
    fin = np.isfinite(compute)
    sums = (cpre[:, None, :] - cpre[:, :, None])
    if not np.allclose(compute[fin], sums[fin], rtol=1e-9, atol=1e-12):
        return None, None
    return cpre, mpre


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def check_feasible(problem: Problem, tables: CostTables) -> None:
    """Raise :class:`InfeasibleError` naming the binding constraint when one is plainly violated.

    Passing this check does not prove feasibility (contiguity can still bind);
    exact solvers prove the rest and :func:`explain_infeasible` words it.
    """
    n = tables.n
    nodes = tables.nodes
    caps = [nd.memory_bytes for nd in nodes]
    for i, unit in enumerate(problem.units):
        need = [tables.memory[j, i, i + 1] for j in range(len(nodes))]
        if all(need[j] > caps[j] for j in range(len(nodes))):
            big = max(range(len(nodes)), key=lambda j: caps[j])
            raise InfeasibleError(
                f"unit {unit.name} ({_gib(need[big])} with its KV cache) fits on no node; "
                f"the largest, {nodes[big].id}, has {_gib(caps[big])}"
            )
    total = [tables.memory[j, 0, n] for j in range(len(nodes))]
    need_total = min(total)
    offered = sorted(caps, reverse=True)
    if need_total > sum(offered):
        raise InfeasibleError(
            f"the model needs {_gib(need_total)} (weights + KV cache for the workload); "
            f"all usable nodes together offer {_gib(sum(offered))}"
        )
    k = tables.max_stages
    if k < len(nodes) and need_total > sum(offered[:k]):
        raise InfeasibleError(
            f"the model needs {_gib(need_total)}; with at most {k} stages the {k} largest nodes "
            f"offer {_gib(sum(offered[:k]))} (raise constraints.max_stages)"
        )
    for pin in problem.constraints.pins:
        j = next(j for j, nd in enumerate(nodes) if nd.id == pin.node)
        need = tables.memory[j, pin.start, pin.end]
        if need > caps[j]:
            first, last = problem.units[pin.start].name, problem.units[pin.end - 1].name
            raise InfeasibleError(
                f"pin {first}..{last} on {pin.node} needs {_gib(need)}, the node has {_gib(caps[j])}"
            )


def explain_infeasible(problem: Problem, tables: CostTables) -> str:
    """Words for a proven infeasibility that the simple checks did not catch."""
    need = min(tables.memory[j, 0, tables.n] for j in range(len(tables.nodes)))
    offered = sum(nd.memory_bytes for nd in tables.nodes)
    parts = [
        f"no contiguous split of the {tables.n} units fits: the model needs {_gib(need)} and the usable nodes "
        f"offer {_gib(offered)} in all, but the units cannot be packed into one range per node"
    ]
    if problem.constraints.pins:
        parts.append(f"with {len(problem.constraints.pins)} pin(s)")
    if problem.constraints.max_stages:
        parts.append(f"and at most {problem.constraints.max_stages} stages")
    return " ".join(parts)


def segments_value(tables: CostTables, segments: list[tuple[int, int, int]], objective: str) -> float:
    """Objective of a plan given as (node index, start, end) segments in chain order."""
    segs = sorted(segments, key=lambda t: t[1])
    outs = []
    for i, (j, _s, e) in enumerate(segs):
        if i + 1 < len(segs):
            outs.append(tables.hop[j, segs[i + 1][0], e])
        else:
            outs.append(tables.ret[j, segs[0][0]] if len(segs) > 1 else 0.0)
    totals = [tables.compute[seg] + out for seg, out in zip(segs, outs)]
    if objective == "latency":
        return float(sum(totals))
    return float(max(max(totals), sum(totals) / tables.mix) if tables.mix else max(totals))


def plan_segments(tables: CostTables, plan: Plan) -> list[tuple[int, int, int]]:
    """A plan as (node index, start, end) segments."""
    pos = {nd.id: j for j, nd in enumerate(tables.nodes)}
    return [(pos[s.node], s.start, s.end) for s in plan.stages]
