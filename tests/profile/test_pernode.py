"""PerNodeCostModel: each node's own unit costs, the default model elsewhere, and its numpy tables."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from noodle import NodeProfile, SpecError
from noodle.graph.costmodel import DefaultCostModel, cost_model_for, evaluate
from noodle.profile.pernode import PerNodeCostModel
from noodle.solvers.tables import _build_generic, build_tables
from noodle.types import Constraints, Pin, Plan
from tests.solvers.instances import random_pernode_problem, random_problem, true_objective

PN = PerNodeCostModel()


def _profiled(seed: int = 3, **kw):
    return random_pernode_problem(seed, n_units=7, n_nodes=4, **kw)


def _first(want, **kw):
    """The first seeded instance with a profiled node for which ``want(profile)`` holds."""
    for seed in range(50):
        p = _profiled(seed, **kw)
        if any(n.profile is not None and want(n.profile) for n in p.cluster.nodes):
            return p
    raise AssertionError("no such instance in 50 seeds")


def test_compute_is_the_sum_of_the_nodes_own_unit_latencies():
    p = _profiled()
    for node in p.cluster.nodes:
        for s, e in ((0, 1), (2, 5), (0, p.num_units)):
            got = PN.stage_compute_ms(p, node, s, e)
            if node.profile is None:
                assert got == DefaultCostModel().stage_compute_ms(p, node, s, e)
            else:
                assert got == pytest.approx(sum(node.profile.latency_ms[s:e]), rel=1e-12)
                assert got != pytest.approx(DefaultCostModel().stage_compute_ms(p, node, s, e), rel=1e-6)


def test_decode_at_the_workloads_batch_size_when_measured():
    p = _first(lambda prof: prof.decode_ms, batch_size=4)
    for node in p.cluster.nodes:
        if node.profile is None:
            continue
        want = dict(node.profile.decode_ms).get(4, node.profile.latency_ms)
        assert PN.stage_compute_ms(p, node, 1, 4) == pytest.approx(sum(want[1:4]), rel=1e-12)
        one = dataclasses.replace(p, workload=dataclasses.replace(p.workload, batch_size=1))
        assert PerNodeCostModel().stage_compute_ms(one, node, 1, 4) == pytest.approx(
            sum(node.profile.latency_ms[1:4]), rel=1e-12)
        # a batch size the node never measured: interpolated between its measured sizes (1 and 4)
        three = dataclasses.replace(p, workload=dataclasses.replace(p.workload, batch_size=3))
        at4 = dict(node.profile.decode_ms).get(4)
        if at4 is not None and node.profile.batch_size == 1:
            mid = [a + (b - a) * 2 / 3 for a, b in zip(node.profile.latency_ms, at4)]
            assert PerNodeCostModel().stage_compute_ms(three, node, 1, 4) == pytest.approx(
                sum(mid[1:4]) + node.profile.step_overhead_ms, rel=1e-12)


def test_decode_latency_interpolates_clamps_and_extrapolates():
    prof = NodeProfile(("a", "b"), (1.0, 2.0), batch_size=2, decode_ms=((4, (1.4, 2.0)), (8, (2.2, 1.0))))
    assert prof.decode_latency_ms(1) == (1.0, 2.0)  # below the smallest measured size: clamped
    assert prof.decode_latency_ms(2) == (1.0, 2.0)
    assert prof.decode_latency_ms(3) == pytest.approx((1.2, 2.0))  # halfway between 2 and 4
    assert prof.decode_latency_ms(6) == pytest.approx((1.8, 1.5))
    assert prof.decode_latency_ms(8) == (2.2, 1.0)
    # past the largest: the last segment's slope (0.2 ms per sequence), never a falling slope
    assert prof.decode_latency_ms(12) == pytest.approx((3.0, 1.0))
    assert NodeProfile(("a",), (5.0,), batch_size=4).decode_latency_ms(32) == (5.0,)  # one size: that size


def test_memory_from_the_nodes_profile_or_the_models():
    p = _first(lambda prof: prof.param_bytes)
    per_token = p.workload.context_tokens * p.workload.sequences
    for node in p.cluster.nodes:
        params = node.profile.param_bytes if node.profile and node.profile.param_bytes else \
            [u.param_bytes for u in p.units]
        want = sum(params[1:5]) + sum(u.kv_bytes_per_token for u in p.units[1:5]) * per_token
        assert PN.stage_memory_bytes(p, node, 1, 5) == want


def test_hops_and_returns_are_the_default_models():
    p = _profiled()
    a, b = p.cluster.nodes[:2]
    assert PN.hop_ms(p, a, b, 3) == DefaultCostModel().hop_ms(p, a, b, 3)
    assert PN.return_ms(p, a, b) == DefaultCostModel().return_ms(p, a, b)


def test_without_profiles_it_is_the_default_model():
    p = random_problem(5, n_units=6, n_nodes=3)
    a, b = build_tables(p, PerNodeCostModel()), build_tables(p, DefaultCostModel())
    for name in ("compute", "memory", "hop", "ret"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("seed", range(8))
def test_numpy_tables_are_bit_identical_to_the_generic_loop(seed):
    cons = Constraints(pins=(Pin(0, 2, "n1"),), exclude=frozenset({"n2"})) if seed % 2 else Constraints()
    p = dataclasses.replace(_profiled(seed, batch_size=1 + 3 * (seed % 3 == 0)), constraints=cons)
    fast, slow = build_tables(p, PerNodeCostModel()), _build_generic(p, PerNodeCostModel())
    for name in ("compute", "memory", "hop", "ret"):
        assert np.array_equal(getattr(fast, name), getattr(slow, name)), name
    assert fast.additive and slow.additive
    assert np.allclose(fast.compute_prefix, slow.compute_prefix, rtol=1e-12)
    assert np.array_equal(fast.memory_prefix, slow.memory_prefix)


@pytest.mark.parametrize("seed", range(6))
def test_a_step_overhead_is_paid_once_per_stage_and_the_tables_match_the_loop(seed):
    cons = Constraints(pins=(Pin(0, 2, "n1"),), exclude=frozenset({"n2"})) if seed % 2 else Constraints()
    p = dataclasses.replace(_profiled(seed, step_overhead=True), constraints=cons)
    plain = _profiled(seed)
    for node, bare in zip(p.cluster.nodes, plain.cluster.nodes):
        o = node.profile.step_overhead_ms if node.profile is not None else 0.0
        for s, e in ((0, 1), (2, 5), (0, p.num_units)):
            assert PN.stage_compute_ms(p, node, s, e) == pytest.approx(PN.stage_compute_ms(plain, bare, s, e) + o,
                                                                        rel=1e-12)
    fast, slow = build_tables(p, PerNodeCostModel()), _build_generic(p, PerNodeCostModel())
    for name in ("compute", "memory", "hop", "ret"):
        assert np.array_equal(getattr(fast, name), getattr(slow, name)), name
    assert not fast.additive and not slow.additive  # a constant per segment is no difference of prefix sums
    if not cons.pins:  # a two-stage plan priced by the model equals the independent sum
        plan = Plan.from_cuts([n.id for n in p.cluster.nodes[:2]], [0, 3, p.num_units])
        assert evaluate(p, plan).objective_ms == pytest.approx(true_objective(p, plan), rel=1e-12)


def test_node_profile_refuses_a_negative_or_infinite_overhead():
    prof = NodeProfile(("a",), (1.0,))
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="step_overhead_ms"):
            dataclasses.replace(prof, step_overhead_ms=bad)


def test_cost_model_for_picks_per_node_only_with_a_profile():
    assert type(cost_model_for(random_problem(1))) is DefaultCostModel
    p = _profiled()
    assert type(cost_model_for(p)) is PerNodeCostModel
    profiled = {n.id for n in p.cluster.nodes if n.profile is not None}
    only_plain = dataclasses.replace(p, constraints=Constraints(exclude=frozenset(profiled)))
    assert type(cost_model_for(only_plain)) is DefaultCostModel


def test_evaluate_defaults_to_the_problems_model_and_matches_the_true_costs():
    p = _profiled(objective="latency")
    ids = [n.id for n in p.cluster.nodes]
    plan = Plan.from_cuts(ids[:3], [0, 2, 5, p.num_units])
    assert evaluate(p, plan).objective_ms == pytest.approx(true_objective(p, plan), rel=1e-12)
    assert evaluate(p, plan).objective_ms == evaluate(p, plan, PN).objective_ms


def test_a_profile_of_other_units_is_refused_naming_the_first_difference():
    p = random_problem(2, n_units=5, n_nodes=2)
    names = tuple(u.name for u in p.units)
    bad = NodeProfile((*names[:3], "x", names[4]), (1.0,) * 5)
    node = dataclasses.replace(p.cluster.nodes[0], profile=bad)
    with pytest.raises(SpecError, match=r"n0: profile: unit 3 is 'x' in the node's profile but 'u3' in the model"):
        dataclasses.replace(p, cluster=dataclasses.replace(p.cluster, nodes=(node, *p.cluster.nodes[1:])))
    short = dataclasses.replace(p.cluster.nodes[0], profile=NodeProfile(names[:4], (1.0,) * 4))
    with pytest.raises(SpecError, match=r"4 units in the node's profile, 5 in the model: the model's unit 4 'u4'"):
        dataclasses.replace(p, cluster=dataclasses.replace(p.cluster, nodes=(short, *p.cluster.nodes[1:])))


def test_node_profile_checks_its_columns():
    with pytest.raises(ValueError, match=r"latency_ms: 2 values for 3 units"):
        NodeProfile(("a", "b", "c"), (1.0, 2.0))
    with pytest.raises(ValueError, match=r"decode_ms\[4\]: 1 values for 2 units"):
        NodeProfile(("a", "b"), (1.0, 2.0), decode_ms=((4, (1.0,)),))
