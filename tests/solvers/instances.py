"""Random heterogeneous placement problems and an independent brute-force optimum."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

from noodle.graph.costmodel import CostModel, DefaultCostModel, evaluate
from noodle.types import GIB, Cluster, Constraints, Link, Node, NodeProfile, Plan, Problem, Unit, Workload


def random_problem(
    seed: int,
    *,
    n_units: int = 6,
    n_nodes: int = 3,
    objective: str = "throughput",
    tight: bool = True,
    constraints: Constraints = Constraints(),
) -> Problem:
    rng = random.Random(seed)
    units = []
    for i in range(n_units):
        units.append(
            Unit(
                name=f"u{i}",
                latency_ms=rng.uniform(0.2, 3.0),
                param_bytes=int(rng.uniform(0.05, 0.6) * GIB),
                activation_bytes=rng.choice([4096, 65536, 1 << 20, 8 << 20]),
                kv_bytes_per_token=rng.choice([0, 1024, 4096]),
            )
        )
    total = sum(u.param_bytes for u in units) / GIB
    nodes = []
    for j in range(n_nodes):
        mem = rng.uniform(0.3, 0.9) * total if tight else 2 * total
        nodes.append(
            Node(
                id=f"n{j}",
                device=rng.choice(["gpu", "igpu", "cpu"]),
                memory_gb=round(mem, 3),
                compute_score=round(rng.uniform(0.5, 6.0), 2),
            )
        )
    pairs = []
    for a, b in itertools.combinations(range(n_nodes), 2):
        if rng.random() < 0.5:
            pairs.append((f"n{a}", f"n{b}", Link(rng.uniform(0.5, 20.0), rng.uniform(0.05, 2.0))))
    cluster = Cluster(tuple(nodes), Link(1.0, 0.5), tuple(pairs))
    return Problem(tuple(units), cluster, Workload(64, 32, 1), objective, constraints, f"random-{seed}")


def all_plans(problem: Problem):
    """Every ordered sequence of distinct usable nodes with every split of the chain."""
    n = problem.num_units
    nodes = [nd.id for nd in problem.cluster.nodes if nd.id not in problem.constraints.exclude]
    cap = problem.constraints.max_stages or len(nodes)
    for k in range(1, min(cap, len(nodes), n) + 1):
        for seq in itertools.permutations(nodes, k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                yield Plan.from_cuts(seq, [0, *cuts, n])


def is_feasible(problem: Problem, plan: Plan, cm: CostModel | None = None) -> bool:
    cm = cm or DefaultCostModel()
    n = problem.num_units
    st = plan.stages
    if not st or st[0].start != 0 or st[-1].end != n:
        return False
    if any(a.end != b.start for a, b in zip(st, st[1:])) or any(s.end <= s.start for s in st):
        return False
    if len({s.node for s in st}) != len(st) or any(s.node in problem.constraints.exclude for s in st):
        return False
    if problem.constraints.max_stages and len(st) > problem.constraints.max_stages:
        return False
    for s in st:
        node = problem.cluster.node(s.node)
        if cm.stage_memory_bytes(problem, node, s.start, s.end) > node.memory_bytes:
            return False
    for pin in problem.constraints.pins:
        if not any(s.node == pin.node and s.start <= pin.start and pin.end <= s.end for s in st):
            return False
    return True


def brute_force(problem: Problem, cm: CostModel | None = None) -> float | None:
    """Optimal objective by enumeration (None when infeasible)."""
    best = None
    for plan in all_plans(problem):
        if is_feasible(problem, plan, cm):
            value = evaluate(problem, plan, cm).objective_ms
            if best is None or value < best:
                best = value
    return best


def llama_like_units(n_blocks: int, *, block_ms: float = 34.3, block_gib: float = 1.59) -> tuple[Unit, ...]:
    """A real-architecture-shaped chain (embed, identical blocks, head) without transformers.

    Defaults follow Llama-2-70B in float16 as :mod:`noodle.models.analytic` profiles it.
    """
    embed = Unit("embed", 0.0, int(0.49 * GIB), 16384, 0)
    blocks = [Unit(f"block.{i}", block_ms, int(block_gib * GIB), 16384, 4096) for i in range(n_blocks)]
    head = Unit("lm_head", 10.5, int(0.49 * GIB), 8, 0)
    return (embed, *blocks, head)


def random_pernode_problem(seed: int, *, n_units: int = 6, n_nodes: int = 3, objective: str = "throughput",
                           tight: bool = True, batch_size: int = 1, step_overhead: bool = False) -> Problem:
    """:func:`random_problem` whose nodes (all but one, at random) carry their own measured unit costs.

    Each profiled node is its own mix: a speed-up on blocks (2-10x) and a 2-5x smaller one on the
    first and last unit (memory-bound; at least 1x), each unit jittered by +-15 %; some nodes were timed
    at batch size 4 as well, and some load their weights at half the bytes (another dtype).
    ``compute_score`` stays the single number the default model would use. With ``step_overhead``,
    each profiled node also pays a fixed cost per stage and step of 0.3-3x its mean unit (drawn from a
    separate stream, so the instance is otherwise the same).
    """
    p = random_problem(seed, n_units=n_units, n_nodes=n_nodes, objective=objective, tight=tight)
    rng = random.Random(seed * 7919 + 1)
    plain = rng.randrange(n_nodes)
    nodes = []
    for j, node in enumerate(p.cluster.nodes):
        if j == plain and n_nodes > 1:
            nodes.append(node)
            continue
        block_speed = rng.uniform(2.0, 10.0)
        edge_speed = max(1.0, block_speed / rng.uniform(2.0, 5.0))
        lat = []
        for i, u in enumerate(p.units):
            speed = edge_speed if i in (0, n_units - 1) else block_speed
            lat.append(u.latency_ms / speed * rng.uniform(0.85, 1.15))
        decode = ((4, tuple(x * rng.uniform(1.2, 2.5) for x in lat)),) if rng.random() < 0.5 else ()
        params = tuple(u.param_bytes // 2 for u in p.units) if rng.random() < 0.3 else None
        prof = NodeProfile(tuple(u.name for u in p.units), tuple(lat), 1, decode, params)
        if step_overhead:
            extra = random.Random(seed * 104729 + j).uniform(0.3, 3.0) * sum(lat) / len(lat)
            prof = replace(prof, step_overhead_ms=extra)
        nodes.append(replace(node, profile=prof))
    cluster = replace(p.cluster, nodes=tuple(nodes))
    return replace(p, cluster=cluster, workload=replace(p.workload, batch_size=batch_size))


def true_objective(problem: Problem, plan: Plan) -> float:
    """A plan's objective computed straight from the nodes' measured unit costs (independent of any CostModel)."""
    b = problem.workload.batch_size
    totals = []
    st = plan.stages
    for k, s in enumerate(st):
        node = problem.cluster.node(s.node)
        if node.profile is None:
            compute = sum(u.latency_ms for u in problem.units[s.start:s.end]) / node.compute_score
        else:
            per_batch = dict(node.profile.decode_ms)
            lat = per_batch.get(b, node.profile.latency_ms) if b != node.profile.batch_size else node.profile.latency_ms
            compute = sum(lat[s.start:s.end]) + node.profile.step_overhead_ms
        if k + 1 < len(st):
            link = problem.cluster.link(s.node, st[k + 1].node)
            out = link.latency_ms + problem.units[s.end - 1].activation_bytes * 8 / (link.bandwidth_gbps * 1e9) * 1e3
        else:
            out = problem.cluster.link(s.node, st[0].node).latency_ms if len(st) > 1 else 0.0
        totals.append(compute + out)
    return sum(totals) if problem.objective == "latency" else max(totals)
