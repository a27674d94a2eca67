"""Exactness of the scaled solvers: set DP, bounds, reduced models, heuristic quality, baselines, anytime."""

from __future__ import annotations

import dataclasses
import random
import statistics

import numpy as np
import pytest

from noodle import NoodleError, evaluate, solve
from noodle.graph.costmodel import DefaultCostModel
from noodle.solvers import SOLVERS
from noodle.solvers.bounds import latency_bound, throughput_bound
from noodle.solvers.exact.cpsat import CpSatSolver
from bench.generate import random_instance
from noodle.solvers.search.heuristic import HeuristicSolver, search_orders
from noodle.solvers.exact.milp import MilpSolver
from noodle.solvers.exact.subsetdp import node_classes, solve_subset_dp
from noodle.solvers.tables import build_tables, segments_value
from noodle.types import Constraints, Pin
from tests.solvers.instances import brute_force, is_feasible, llama_like_units, random_problem

CM = DefaultCostModel()


def _small(seed: int):
    rng = random.Random(seed)
    obj = ("throughput", "latency")[seed % 2]
    cons = Constraints(max_stages=2) if seed % 5 == 0 else Constraints()
    p = random_problem(seed, n_units=rng.randint(2, 7), n_nodes=rng.randint(1, 4), objective=obj,
                       tight=seed % 3 != 0, constraints=cons)
    if seed % 4 == 1:  # identical nodes with identical links: symmetry classes
        nodes = list(p.cluster.nodes)
        twins = [nodes[0]] + [dataclasses.replace(nodes[0], id=f"twin{i}") for i in range(1, len(nodes))]
        p = dataclasses.replace(p, cluster=dataclasses.replace(p.cluster, nodes=tuple(twins), pair_links=()))
    return p


@pytest.mark.parametrize("seed", range(40))
def test_set_dp_and_bounds_against_brute_force(seed):
    p = _small(seed)
    tables = build_tables(p, CM)
    best = brute_force(p)
    value, segs = solve_subset_dp(tables, p.objective)
    if best is None:
        assert value == float("inf") and segs == []
        return
    assert value == pytest.approx(best, rel=1e-9)
    assert segments_value(tables, segs, p.objective) == pytest.approx(best, rel=1e-9)
    lb = latency_bound(tables, upper=best) if p.objective == "latency" else throughput_bound(tables, upper=best)
    assert lb <= best * (1 + 1e-9) + 1e-12  # a lower bound is never above the optimum


def test_symmetry_classes_group_identical_nodes():
    p = _small(1)
    classes = node_classes(build_tables(p, CM))
    assert sorted(len(c) for c in classes)[-1] == len(p.cluster.nodes)


def _real_like(seed: int, n_blocks: int, n_nodes: int, objective: str):
    return random_instance(seed, units=llama_like_units(n_blocks), n_nodes=n_nodes, objective=objective)


@pytest.mark.parametrize("objective", ["throughput", "latency"])
@pytest.mark.parametrize("seed", [0, 1])
def test_cpsat_and_milp_agree_on_larger_instances(seed, objective):
    """Full models (no hint, so no reductions) on 14 units x 5 nodes: both prove the DP's optimum."""
    p = _real_like(seed, 12, 5, objective)
    tables = build_tables(p, CM)
    dp, _ = solve_subset_dp(tables, objective)
    cp = CpSatSolver().solve(p, tables, time_limit_s=30)
    mi = MilpSolver().solve(p, tables, time_limit_s=30)
    assert cp.status == "optimal" and mi.status == "optimal"
    assert evaluate(p, cp.plan).objective_ms == pytest.approx(dp, rel=1e-6)
    assert evaluate(p, mi.plan).objective_ms == pytest.approx(dp, rel=1e-6)


@pytest.mark.parametrize("objective", ["throughput", "latency"])
def test_reduced_models_keep_the_optimum(objective):
    """With the heuristic's plan as hint the models shrink; the proven value is still the DP optimum."""
    p = _real_like(7, 30, 7, objective)
    tables = build_tables(p, CM)
    dp, _ = solve_subset_dp(tables, objective)
    for name in ("cpsat", "milp", "auto"):  # each proves it in ~1 s; the limit is out of reach on a busy machine
        res = solve(p, solver=name, time_limit_s=600)
        assert res.status == "optimal", (name, res)
        assert res.objective_ms == pytest.approx(dp, rel=1e-6), name


def test_heuristic_quality_on_random_instances():
    gaps = []
    for seed in range(12):
        obj = ("throughput", "latency")[seed % 2]
        p = _real_like(100 + seed, 18, 6, obj)
        tables = build_tables(p, CM)
        opt, _ = solve_subset_dp(tables, obj)
        res = HeuristicSolver().solve(p, tables, time_limit_s=5)
        assert is_feasible(p, res.plan)
        gaps.append(res.objective_ms / opt - 1)
    assert statistics.median(gaps) <= 0.02 and max(gaps) <= 0.10, gaps


def test_pins_can_sit_anywhere_in_the_heuristic_order():
    """A pin on the head's node: that node must come last; the heuristic must not force it first."""
    base = _real_like(3, 10, 4, "throughput")
    last = base.cluster.nodes[1].id
    p = dataclasses.replace(base, constraints=Constraints(pins=(Pin(base.num_units - 1, base.num_units, last),)))
    tables = build_tables(p, CM)
    opt, _ = solve_subset_dp(tables, "throughput")
    res = solve(p, solver="heuristic")
    assert res.plan.stages[-1].node == last
    assert res.objective_ms <= opt * 1.10
    assert solve(p, solver="auto").objective_ms == pytest.approx(opt, rel=1e-9)


def test_registry_order_keeps_auto_preference_and_baselines_last():
    names = SOLVERS.names()
    assert names[:4] == ["auto", "cpsat", "milp", "heuristic"]
    assert names[4:] == ["baseline-uniform", "baseline-params", "baseline-memory", "baseline-petals"]


@pytest.mark.parametrize("name", ["baseline-uniform", "baseline-params", "baseline-memory", "baseline-petals"])
def test_baselines_give_valid_plans_or_say_why_not(name):
    placed = 0
    for seed in range(6):
        p = _real_like(seed, 20, 5, "throughput")
        try:
            res = solve(p, solver=name)
        except NoodleError as exc:
            assert "cannot place this model" in str(exc) and "GiB" in str(exc)
            continue
        placed += 1
        assert res.status == "baseline" and is_feasible(p, res.plan)
        assert res.objective_ms >= solve(p, solver="auto").objective_ms * (1 - 1e-9)
    assert name != "baseline-petals" or placed > 0


def test_ctrl_c_returns_the_incumbent(monkeypatch):
    """A KeyboardInterrupt inside the search: the best plan so far comes back, marked interrupted."""
    import noodle.solvers.search.heuristic as heuristic

    p = _real_like(11, 40, 12, "throughput")
    tables = build_tables(p, CM)
    calls = {"n": 0}
    real = heuristic.dp_values

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(heuristic, "dp_values", flaky)
    res = search_orders(tables, "throughput", time_limit_s=30)
    assert res.interrupted and res.segments
    calls["n"] = 2  # the interrupt comes in the heuristic's local search (auto may prove the optimum soon after)
    out = solve(p, solver="auto", time_limit_s=30)
    assert out.interrupted and out.plan is not None and "interrupted" in out.note
    assert is_feasible(p, out.plan)
    assert out.objective_ms == pytest.approx(evaluate(p, out.plan).objective_ms)


def test_tables_fast_path_scales():
    p = _real_like(0, 96, 32, "throughput")
    t = build_tables(p, CM)
    assert t.additive and t.flat_hops() is not None and np.isfinite(t.compute).any()


def test_set_dp_refuses_huge_state_spaces():
    """64 distinct nodes: 2^64 count vectors (no int64 overflow in the estimate); auto must not try the DP."""
    from noodle.solvers.exact.subsetdp import dp_seconds

    p = random_instance(0, units=llama_like_units(4), n_nodes=64, objective="throughput")
    assert dp_seconds(build_tables(p, CM), "throughput") == float("inf")
