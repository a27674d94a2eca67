"""Every solver honours the per-node cost model: brute force on random heterogeneous instances."""

from __future__ import annotations

import random

import pytest

from noodle import InfeasibleError, NoodleError, solve
from noodle.graph.costmodel import evaluate
from noodle.profile.pernode import PerNodeCostModel
from noodle.solvers import SOLVERS
from noodle.types import GIB, Cluster, Link, Node, NodeProfile, Problem, Unit, Workload
from tests.solvers.instances import brute_force, is_feasible, random_pernode_problem, true_objective

EXACT = ("auto", "cpsat", "milp", "heuristic")  # the heuristic runs its set DP on instances this small
BASELINES = [name for name in SOLVERS.names() if name.startswith("baseline-")]


def _instance(seed: int, objective: str) -> Problem:
    rng = random.Random(seed)
    return random_pernode_problem(seed, n_units=rng.randint(4, 7), n_nodes=rng.randint(3, 4), objective=objective,
                                  tight=seed % 4 != 0, batch_size=rng.choice((1, 4)))


@pytest.mark.parametrize("objective", ["throughput", "latency"])
@pytest.mark.parametrize("seed", range(14))
def test_every_solver_reaches_the_brute_force_optimum_under_per_node_costs(seed, objective):
    p = _instance(seed, objective)
    cm = PerNodeCostModel()
    best = brute_force(p, cm)
    for name in EXACT:
        if best is None:
            with pytest.raises(InfeasibleError):
                solve(p, solver=name, time_limit_s=10)
            continue
        result = solve(p, solver=name, time_limit_s=10)  # no cost model given: the problem's, per-node
        assert is_feasible(p, result.plan, cm), name
        assert result.objective_ms == pytest.approx(best, rel=1e-9), name
        assert true_objective(p, result.plan) == pytest.approx(best, rel=1e-9), name
        if name != "heuristic":
            assert result.status == "optimal", name
    for name in BASELINES:  # a baseline's plan is checked and priced under the same per-node costs
        try:
            result = solve(p, solver=name, time_limit_s=10)
        except NoodleError:
            continue
        assert is_feasible(p, result.plan, cm), name
        assert result.objective_ms == pytest.approx(true_objective(p, result.plan), rel=1e-9), name
        assert best is not None and result.objective_ms >= best * (1 - 1e-9), name


@pytest.mark.parametrize("objective", ["throughput", "latency"])
@pytest.mark.parametrize("seed", range(10))
def test_exact_solvers_reach_the_brute_force_optimum_with_a_step_overhead_per_stage(seed, objective):
    """Each stage pays its node's fixed cost per step: the tables stay exact, so do the solvers."""
    rng = random.Random(seed)
    p = random_pernode_problem(seed, n_units=rng.randint(4, 7), n_nodes=rng.randint(3, 4), objective=objective,
                               tight=seed % 4 != 0, batch_size=rng.choice((1, 4)), step_overhead=True)
    assert any(n.profile is not None and n.profile.step_overhead_ms > 0 for n in p.cluster.nodes)
    cm = PerNodeCostModel()
    best = brute_force(p, cm)
    for name in EXACT:
        if best is None:
            with pytest.raises(InfeasibleError):
                solve(p, solver=name, time_limit_s=10)
            continue
        result = solve(p, solver=name, time_limit_s=10)
        assert is_feasible(p, result.plan, cm), name
        assert result.objective_ms == pytest.approx(best, rel=1e-9), name
        assert true_objective(p, result.plan) == pytest.approx(best, rel=1e-9), name
        if name != "heuristic":
            assert result.status == "optimal", name


def test_a_step_overhead_changes_the_optimum():
    """Not vacuous: on some instances the overhead makes another plan optimal (fewer or other stages)."""
    changed = 0
    for seed in range(10):
        for objective in ("throughput", "latency"):
            plain = random_pernode_problem(seed, n_units=6, n_nodes=3, objective=objective, tight=False)
            heavy = random_pernode_problem(seed, n_units=6, n_nodes=3, objective=objective, tight=False,
                                           step_overhead=True)
            a = solve(plain, solver="cpsat", time_limit_s=10).plan
            b = solve(heavy, solver="cpsat", time_limit_s=10).plan
            assert true_objective(heavy, b) <= true_objective(heavy, a) * (1 + 1e-9)
            changed += [(s.node, s.start, s.end) for s in a.stages] != [(s.node, s.start, s.end) for s in b.stages]
    assert changed >= 3


def test_instances_have_per_unit_speed_ratios_and_both_outcomes():
    """The random instances are what they claim: profiled nodes whose speed-up differs from unit to unit."""
    feasible = 0
    for seed in range(14):
        p = _instance(seed, "throughput")
        speedups = [
            [u.latency_ms / ms for u, ms in zip(p.units, n.profile.latency_ms)]
            for n in p.cluster.nodes if n.profile is not None
        ]
        assert speedups
        for s in speedups:  # blocks gain more than embed and lm_head: no single compute_score describes the node
            blocks, edges = s[1:-1], (s[0], s[-1])
            assert sum(blocks) / len(blocks) > 1.4 * sum(edges) / 2
        feasible += brute_force(p, PerNodeCostModel()) is not None
    assert feasible >= 12  # the brute-force comparison above is real on at least 12 instances per objective


@pytest.mark.parametrize("name", [*EXACT, "baseline-petals"])
def test_memory_comes_from_the_nodes_own_profile(name):
    """A node that loads the weights at half the bytes holds the whole model; by the model's bytes nothing fits."""
    names = ["embed", "block.0", "block.1", "lm_head"]
    units = tuple(Unit(n, 1.0, GIB // 2, 4096, 0) for n in names)  # 2 GiB in all
    half = NodeProfile(tuple(names), (0.5,) * 4, param_bytes=(GIB // 4,) * 4)
    nodes = (Node("small", "cuda", 1.2, 2.0, profile=half), Node("tiny", "cpu", 0.6, 1.0))
    p = Problem(units, Cluster(nodes, Link(1.0, 0.5)), Workload(16, 16, 1), "latency")
    assert brute_force(p, PerNodeCostModel()) == pytest.approx(2.0)
    result = solve(p, solver=name, time_limit_s=10)
    assert [(s.node, s.start, s.end) for s in result.plan.stages] == [("small", 0, 4)]
    plain = Problem(units, Cluster((Node("small", "cuda", 1.2, 2.0), nodes[1]), Link(1.0, 0.5)), p.workload, "latency")
    with pytest.raises(InfeasibleError):
        solve(plain, solver=name, time_limit_s=10)


def _gpu_lm_head_case(objective: str) -> tuple[Problem, Problem]:
    """A GPU 10x faster on blocks but only 2x on lm_head; the same cluster described by one compute_score per node."""
    names = ["embed", *(f"block.{i}" for i in range(6)), "lm_head"]
    ref = [0.2, *[2.0] * 6, 6.0]
    units = tuple(Unit(name, ms, GIB // 2, 1 << 16, 0) for name, ms in zip(names, ref))
    gpu = NodeProfile(tuple(names), (0.1, *[0.2] * 6, 3.0))
    igpu = NodeProfile(tuple(names), (0.1, *[1.0] * 6, 2.0))
    nodes = tuple(
        Node(nid, dev, 16, sum(ref) / sum(prof.latency_ms) if prof else 1.0, profile=prof)
        for nid, dev, prof in (("gpu", "cuda", gpu), ("igpu", "igpu", igpu), ("cpu", "cpu", None))
    )
    measured = Problem(units, Cluster(nodes, Link(10.0, 0.1)), Workload(64, 32, 1), objective)
    scored = Problem(units, Cluster(tuple(Node(n.id, n.device, n.memory_gb, n.compute_score) for n in nodes),
                                    Link(10.0, 0.1)), Workload(64, 32, 1), objective)
    return measured, scored


@pytest.mark.parametrize("objective", ["throughput", "latency"])
def test_per_node_plan_differs_from_the_compute_score_plan_and_is_better(objective):
    measured, scored = _gpu_lm_head_case(objective)
    per_node = solve(measured, solver="auto", time_limit_s=10)
    by_score = solve(scored, solver="auto", time_limit_s=10)
    assert per_node.plan != by_score.plan
    # under the true (measured) costs the per-node plan wins, and the compute_score plan mispredicts itself
    assert true_objective(measured, per_node.plan) < true_objective(measured, by_score.plan) * 0.95
    assert per_node.objective_ms == pytest.approx(true_objective(measured, per_node.plan), rel=1e-12)
    assert evaluate(measured, by_score.plan).objective_ms == pytest.approx(
        true_objective(measured, by_score.plan), rel=1e-12)
