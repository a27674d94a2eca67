"""Continuous batching (``Workload.streams``): the solvers against an independent brute force of the batched round."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from noodle import InfeasibleError, NoodleError, evaluate, solve
from noodle.profile.pernode import PerNodeCostModel
from noodle.solvers.batched import batched_parts
from noodle.types import Cluster, Link, Node, NodeProfile, Plan, Problem, Unit, Workload
from tests.solvers.instances import all_plans, is_feasible, random_pernode_problem

SEEDS = range(6)
PN = PerNodeCostModel()  # memory as the nodes load their weights
STREAMS = (1, 2, 3, 5)


def _step_ms(prof: NodeProfile, b: int, i: int) -> float:
    """Unit i's step at batch b, interpolated here from the profile's points (independent of NodeProfile)."""
    pts = sorted({prof.batch_size: prof.latency_ms[i], **{k: ms[i] for k, ms in prof.decode_ms}}.items())
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    if b <= xs[0] or len(xs) == 1:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if b <= x1:
            return y0 + (y1 - y0) * (b - x0) / (x1 - x0)
    slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
    return ys[-1] + slope * (b - xs[-1])


def batched_value(problem: Problem, plan: Plan) -> float:
    """The plan's objective under continuous batching, straight from the definition (no CostModel)."""
    c = problem.workload.streams
    st = plan.stages
    g = min(len(st), c)
    b = math.ceil(c / g)
    totals = []
    for k, s in enumerate(st):
        node = problem.cluster.node(s.node)
        if node.profile is None:
            compute = sum(u.latency_ms for u in problem.units[s.start:s.end]) / node.compute_score
        else:
            compute = sum(_step_ms(node.profile, b, i) for i in range(s.start, s.end)) + node.profile.step_overhead_ms
        if k + 1 < len(st):
            link = problem.cluster.link(s.node, st[k + 1].node)
            out = link.latency_ms + b * problem.units[s.end - 1].activation_bytes * 8 / (link.bandwidth_gbps * 1e9) * 1e3
        else:
            out = problem.cluster.link(s.node, st[0].node).latency_ms if len(st) > 1 else 0.0
        totals.append(compute + out)
    rnd = max(g * max(totals), sum(totals))
    return rnd / c if problem.objective == "throughput" else rnd


def _problem(seed: int, streams: int, objective: str = "throughput") -> Problem:
    p = random_pernode_problem(seed, n_units=6, n_nodes=4 if seed % 2 else 3, objective=objective, tight=seed % 3 != 0,
                               step_overhead=seed % 2 == 0)
    return replace(p, workload=Workload(64, 32, streams=streams))


def _brute(problem: Problem) -> float | None:
    vals = [batched_value(problem, plan) for plan in all_plans(problem) if is_feasible(problem, plan, PN)]
    return min(vals) if vals else None


CASES = [(seed, c, "throughput") for seed in SEEDS for c in STREAMS] + [(seed, c, "latency") for seed in (0, 1) for c in (2, 5)]


@pytest.fixture(scope="module")
def optima() -> dict:
    return {case: (p := _problem(*case), _brute(p)) for case in CASES}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b)) + 1e-9


@pytest.mark.parametrize("solver", ["cpsat", "milp"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c[0]}-C{c[1]}-{c[2]}")
def test_exact_solvers_reach_the_batched_optimum(solver, case, optima):
    problem, best = optima[case]
    if best is None:
        with pytest.raises(InfeasibleError):
            solve(problem, solver=solver, time_limit_s=20)
        return
    res = solve(problem, solver=solver, time_limit_s=20)
    assert res.status == "optimal", res
    assert _close(res.objective_ms, best), (res.objective_ms, best, res.plan)
    assert _close(batched_value(problem, res.plan), best)
    assert is_feasible(problem, res.plan, PN)


@pytest.mark.parametrize("solver", ["auto", "heuristic"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c[0]}-C{c[1]}-{c[2]}")
def test_auto_and_heuristic_on_the_batched_model(solver, case, optima):
    problem, best = optima[case]
    if best is None:
        with pytest.raises(NoodleError):
            solve(problem, solver=solver, time_limit_s=5)
        return
    res = solve(problem, solver=solver, time_limit_s=5)
    assert is_feasible(problem, res.plan, PN)
    assert _close(res.objective_ms, batched_value(problem, res.plan))
    assert res.objective_ms <= best * 1.10 + 1e-9
    if res.status == "optimal":
        assert _close(res.objective_ms, best)


def test_the_batched_optimum_differs_from_the_micro_batch_one():
    """Somewhere in the seeds the old (bottleneck at batch 1) plan is not the batched optimum: the model matters."""
    worse = 0
    for seed in SEEDS:
        problem = _problem(seed, 3)
        old = replace(problem, workload=Workload(64, 32, batch_size=1, concurrency=3))
        try:
            new_plan = solve(problem, solver="cpsat", time_limit_s=20).plan
            old_plan = solve(old, solver="cpsat", time_limit_s=20).plan
        except InfeasibleError:
            continue
        assert batched_value(problem, new_plan) <= batched_value(problem, old_plan) * (1 + 1e-9)
        worse += batched_value(problem, old_plan) > batched_value(problem, new_plan) * (1 + 1e-6)
    assert worse >= 1


def _two_nodes(streams: int) -> Problem:
    units = tuple(Unit(f"u{i}", 1.0, 1000, 1000) for i in range(4))
    prof = NodeProfile(tuple(u.name for u in units), (1.0,) * 4, batch_size=1, decode_ms=((4, (2.0,) * 4),))
    nodes = (Node("a", "gpu", 1.0, 1.0, profile=prof), Node("b", "cpu", 1.0, 1.0, profile=prof))
    cluster = Cluster(nodes, Link(bandwidth_gbps=8.0, latency_ms=0.5))
    return Problem(units, cluster, Workload(8, 8, streams=streams))


def test_evaluate_prices_the_round_at_the_step_batch():
    # 4 streams on 2 stages: G = 2 batches of b = 2; a unit steps in 1 + (2 - 1) / 3 ms at batch 2
    p = _two_nodes(4)
    ev = evaluate(p, Plan.from_cuts(["a", "b"], [0, 2, 4]))
    assert (ev.groups, ev.step_batch) == (2, 2)
    unit = 1.0 + 1.0 / 3
    hop = 0.5 + 2 * 1000 * 8 / 8e9 * 1e3
    assert ev.stages[0].compute_ms == pytest.approx(2 * unit) and ev.stages[0].out_ms == pytest.approx(hop)
    assert ev.round_ms == pytest.approx(2 * (2 * unit + hop))
    assert ev.objective_ms == pytest.approx(ev.round_ms / 4)
    assert ev.tokens_per_s == pytest.approx(4 * 1e3 / ev.round_ms)
    # 1 stream on 2 stages: the trip binds (one batch of one)
    ev1 = evaluate(_two_nodes(1), Plan.from_cuts(["a", "b"], [0, 2, 4]))
    assert ev1.round_ms == pytest.approx(ev1.token_latency_ms) and ev1.round_ms > ev1.bottleneck_ms


def test_parts_cover_every_stage_count_once():
    p = _two_nodes(3)
    for c, k in ((1, 4), (3, 4), (5, 4), (3, 2)):
        q = replace(p, workload=Workload(8, 8, streams=c))
        parts = batched_parts(q, k)
        counts = [s for part in parts for s in range(part.min_stages, part.max_stages + 1)]
        assert counts == list(range(1, min(k, 4) + 1))
        for part in parts:
            if part.min_stages == part.max_stages and part.objective == "throughput":
                assert part.batch == math.ceil(c / min(part.min_stages, c))
            else:
                assert part.batch == 1


def test_the_plan_file_reports_the_batched_pipeline(tmp_path):
    from noodle.plandoc import dump_plan, load_plan, plan_document

    p = _two_nodes(4)
    res = solve(p, solver="cpsat", time_limit_s=5)
    doc = plan_document(p, res)
    ev = evaluate(p, res.plan)
    pred = doc.predicted
    assert (pred.streams, pred.step_batch) == (4, ev.step_batch) and pred.round_ms == pytest.approx(ev.round_ms)
    assert pred.pipeline_tokens_per_s == pytest.approx(4e3 / ev.round_ms)
    assert doc.workload["streams"] == 4 and doc.workload["batch_size"] == ev.step_batch
    path = tmp_path / "plan.json"
    path.write_text(dump_plan(doc))
    back = load_plan(path).predicted
    assert (back.streams, back.step_batch) == (4, pred.step_batch) and back.round_ms == pytest.approx(pred.round_ms)
    plain = plan_document(replace(p, workload=Workload(8, 8)), res)
    assert "streams" not in plain.as_dict()["predicted"] and "streams" not in plain.workload
