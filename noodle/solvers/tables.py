"""Every cost a solver may need, precomputed once from a Problem and a CostModel.

Solvers never call the cost model themselves: they read these arrays, so any
cost model (additive or not) is solved exactly. ``INF`` marks a segment that may
not exist (over memory, or against a pin).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from noodle.errors import InfeasibleError
from noodle.graph.costmodel import CostModel
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
    """

    nodes: tuple[Node, ...]
    n: int
    compute: np.ndarray
    memory: np.ndarray
    hop: np.ndarray
    ret: np.ndarray
    max_stages: int

    def segments(self) -> list[tuple[int, int, int]]:
        """All allowed (j, s, e), i.e. where compute is finite."""
        j, s, e = np.nonzero(np.isfinite(self.compute))
        return list(zip(j.tolist(), s.tolist(), e.tolist()))


def build_tables(problem: Problem, cost_model: CostModel) -> CostTables:
    """Evaluate the cost model on every (node, range), hop and return edge."""
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
    return CostTables(nodes, n, compute, memory, hop, ret, min(cap, m))


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
    return float(sum(totals) if objective == "latency" else max(totals))


def plan_segments(tables: CostTables, plan: Plan) -> list[tuple[int, int, int]]:
    """A plan as (node index, start, end) segments."""
    pos = {nd.id: j for j, nd in enumerate(tables.nodes)}
    return [(pos[s.node], s.start, s.end) for s in plan.stages]
