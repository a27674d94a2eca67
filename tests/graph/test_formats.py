"""Weight formats as a decision: every exact solver reaches the brute-force optimum over (order, cuts, formats)."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from noodle import InfeasibleError, solve
from noodle.graph.costmodel import cost_model_for, evaluate
from noodle.graph.formats import FormatCostModel, choose_formats
from noodle.plandoc import plan_document
from noodle.types import FormatOption, Formats, NodeProfile, Plan, Problem, Unit
from tests.solvers.instances import random_pernode_problem

EXACT = ("auto", "cpsat", "milp", "heuristic")


def _with_formats(seed: int, objective: str) -> Problem:
    """A per-node instance whose memory is tight, plus int8/int4 costs and per-node allowed formats."""
    rng = random.Random(seed)
    p = random_pernode_problem(seed, n_units=rng.randint(4, 6), n_nodes=rng.randint(2, 3), objective=objective,
                               tight=True)
    options = [FormatOption("float32", p.units, tuple((n.id, n.profile) for n in p.cluster.nodes if n.profile))]
    for name, speed, size in (("int8", (0.4, 0.9), 0.3), ("int4", (0.5, 1.4), 0.17)):
        factors = [rng.uniform(*speed) for _ in p.units]
        units = tuple(replace(u, latency_ms=u.latency_ms * f, param_bytes=int(u.param_bytes * size))
                      for u, f in zip(p.units, factors))
        profiles = []
        for n in p.cluster.nodes:
            if n.profile is not None and rng.random() < 0.7:
                lat = tuple(ms * rng.uniform(*speed) for ms in n.profile.latency_ms)
                profiles.append((n.id, NodeProfile(n.profile.unit_names, lat, n.profile.batch_size,
                                                   param_bytes=tuple(u.param_bytes for u in units))))
        options.append(FormatOption(name, units, tuple(profiles), note=f"{name} note"))
    allowed = []
    for n in p.cluster.nodes:
        names = [o.name for o in options if rng.random() < 0.7] or ["float32"]
        allowed.append((n.id, tuple(names)))
    return replace(p, formats=Formats(tuple(options), tuple(allowed)))


def _stage_cost(p: Problem, node_id: str, s: int, e: int, fmt: str) -> tuple[float, int]:
    """Compute and memory of units [s, e) on a node in one format, from first principles."""
    assert p.formats is not None
    opt = p.formats.option(fmt)
    node = p.cluster.node(node_id)
    prof = opt.profile(node_id)
    w = p.workload
    kv = sum(u.kv_bytes_per_token for u in p.units[s:e]) * w.context_tokens * w.sequences
    if prof is None:
        return sum(u.latency_ms for u in opt.units[s:e]) / node.compute_score, \
            sum(u.param_bytes for u in opt.units[s:e]) + kv
    params = prof.param_bytes or tuple(u.param_bytes for u in opt.units)
    return sum(prof.decode_latency_ms(w.batch_size)[s:e]), sum(params[s:e]) + kv


def _brute_force(p: Problem) -> float | None:
    assert p.formats is not None
    n, best = p.num_units, None
    ids = p.cluster.node_ids
    for k in range(1, len(ids) + 1):
        for order in itertools.permutations(ids, k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = [0, *cuts, n]
                for fmts in itertools.product(*[dict(p.formats.allowed)[v] for v in order]):
                    totals, ok = [], True
                    for i, (v, f) in enumerate(zip(order, fmts)):
                        ms, mem = _stage_cost(p, v, bounds[i], bounds[i + 1], f)
                        if mem > p.cluster.node(v).memory_bytes:
                            ok = False
                            break
                        if i + 1 < k:
                            out = p.cluster.link(v, order[i + 1]).transfer_ms(p.units[bounds[i + 1] - 1].activation_bytes)
                        else:
                            out = p.cluster.link(v, order[0]).latency_ms if k > 1 else 0.0
                        totals.append(ms + out)
                    if ok:
                        val = sum(totals) if p.objective == "latency" else max(totals)
                        best = val if best is None or val < best else best
    return best


@pytest.mark.parametrize("objective", ["throughput", "latency"])
@pytest.mark.parametrize("seed", range(10))
def test_exact_solvers_reach_the_brute_force_optimum_over_formats(seed, objective):
    p = _with_formats(seed, objective)
    assert isinstance(cost_model_for(p), FormatCostModel)
    best = _brute_force(p)
    for name in EXACT:
        if best is None:
            with pytest.raises(InfeasibleError):
                solve(p, solver=name, time_limit_s=10)
            continue
        result = solve(p, solver=name, time_limit_s=10)
        assert result.objective_ms == pytest.approx(best, rel=1e-9), name
        # the formats written into the plan reach the same objective, and each fits its node
        doc = plan_document(p, result)
        assert doc.objective_ms == pytest.approx(best, rel=1e-9), name
        for st in doc.stages:
            assert st.format in dict(p.formats.allowed)[st.node]
            ms, mem = _stage_cost(p, st.node, st.start, st.end, st.format)
            assert mem <= p.cluster.node(st.node).memory_bytes
            assert st.compute_ms == pytest.approx(ms, rel=1e-9)
            assert f"format {st.format}" in st.rationale


def test_instances_choose_quantized_formats_and_need_them():
    """Over the instances, some plans quantize, and some are infeasible in float32 alone but not with formats."""
    quantized = rescued = 0
    for seed in range(10):
        p = _with_formats(seed, "throughput")
        best = _brute_force(p)
        if best is None:
            continue
        plan = solve(p, time_limit_s=10).plan
        quantized += any(f != "float32" for f in choose_formats(p, plan))
        only_fp32 = replace(p, formats=Formats(p.formats.options, tuple((v, ("float32",)) for v in p.cluster.node_ids)))
        rescued += _brute_force(only_fp32) is None
    assert quantized >= 3 and rescued >= 1


def test_a_free_stage_is_raised_to_a_more_precise_format():
    """Throughput: a stage below the bottleneck keeps float32 when int8 would gain nothing at the objective."""
    units = tuple(Unit(f"u{i}", 10.0, 100, 8) for i in range(4))
    fast = tuple(replace(u, latency_ms=5.0, param_bytes=30) for u in units)
    from noodle.types import Cluster, Link, Node
    nodes = (Node("slow", "cpu", 1.0, 1.0), Node("fast", "cpu", 1.0, 4.0))
    p = Problem(units, Cluster(nodes, Link(100.0, 0.0)), objective="throughput",
                formats=Formats((FormatOption("float32", units), FormatOption("int8", fast)),
                                (("slow", ("float32", "int8")), ("fast", ("float32", "int8")))))
    plan = Plan.from_cuts(["slow", "fast"], [0, 2, 4])
    fmts = choose_formats(p, plan)
    assert fmts == ["int8", "float32"]  # slow: 2 units at 10 ms each is 20 ms in float32, 10 in int8 (the bottleneck)
    ev = evaluate(p, plan, FormatCostModel())
    assert ev.bottleneck_ms == pytest.approx(10.0)
