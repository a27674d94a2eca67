"""Batch curves where no node measured one: an analytic model's roofline prices a step at the batch it runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from noodle.graph.costmodel import DefaultCostModel, evaluate
from noodle.profile.pernode import PerNodeCostModel, profile_decode_ms
from noodle.solvers.tables import _build_generic, build_tables
from noodle.spec import parse_spec
from noodle.types import Plan, Problem, Stage

CONFIG = Path(__file__).resolve().parents[2] / "specs" / "models" / "gpt2-small.json"


def _problem(workload: dict, profile_times: float | None = None) -> Problem:
    """gpt2-small (analytic) on node ``a`` (compute_score 1) and, with ``profile_times``, node ``b`` profiled at batch 1
    only, each unit ``profile_times`` x the analytic batch-1 figure."""
    base = parse_spec({"model": {"hf_config": str(CONFIG)}, "workload": workload,
                       "cluster": {"nodes": [{"id": "a", "memory_gb": 64, "compute_score": 1.0}]}})
    units = base.to_problem().units
    nodes = [{"id": "a", "memory_gb": 64, "compute_score": 1.0}]
    if profile_times is not None:
        rows = [{"name": u.name, "latency_ms": u.latency_ms * profile_times} for u in units]
        nodes.append({"id": "b", "memory_gb": 64, "profile": {"batch_size": 1, "units": rows}})
    spec = parse_spec({"model": {"hf_config": str(CONFIG)}, "workload": workload, "cluster": {"nodes": nodes}})
    return spec.to_problem()


def _at(p: Problem, batch: int) -> Problem:
    return replace(p, workload=replace(p.workload, batch_size=batch))


def test_a_node_without_a_profile_pays_more_for_a_bigger_batch_and_the_old_figure_at_one() -> None:
    p = _problem({"prompt_tokens": 256, "max_new_tokens": 64, "streams": 8})
    a = p.cluster.node("a")
    n = p.num_units
    steps = [DefaultCostModel().stage_compute_ms(_at(p, b), a, 0, n) for b in range(1, 33)]
    assert steps[0] == pytest.approx(sum(u.latency_ms for u in p.units), rel=1e-12)  # batch 1: as before
    assert all(x < y for x, y in zip(steps, steps[1:]))  # strictly more per extra sequence (KV reads grow)
    assert steps[7] < 8 * steps[0]  # the weights are read once for all 8
    for b in (1, 3, 8):
        t = build_tables(_at(p, b), DefaultCostModel())
        assert t.compute[0, 0, n] == pytest.approx(steps[b - 1], rel=1e-12)


def test_a_node_profiled_at_one_batch_scales_its_figures_along_the_curve() -> None:
    p = _problem({"prompt_tokens": 256, "max_new_tokens": 64, "streams": 8}, profile_times=2.0)
    a, b = p.cluster.node("a"), p.cluster.node("b")
    assert b.profile is not None and not b.profile.decode_ms  # one measured batch size
    n = p.num_units
    cm = PerNodeCostModel()
    assert profile_decode_ms(b.profile, p.units, 1) == b.profile.latency_ms  # exactly the measurement at its batch
    prev = 0.0
    for batch in (1, 2, 4, 8, 16):
        q = _at(p, batch)
        mine = PerNodeCostModel().stage_compute_ms(q, b, 0, n)
        assert mine == pytest.approx(2.0 * cm.stage_compute_ms(q, a, 0, n), rel=1e-9)
        assert mine > prev
        prev = mine
        gen = _build_generic(q, PerNodeCostModel())
        assert (build_tables(q, PerNodeCostModel()).compute == gen.compute).all()


def test_the_batched_round_prices_the_step_batch_on_the_curve() -> None:
    """One stage, 8 streams: the round is one step of all 8 (curve at 8), not eight times the batch-1 step."""
    p = _problem({"prompt_tokens": 256, "max_new_tokens": 64, "streams": 8})
    plan = Plan((Stage("a", 0, p.num_units),))
    ev = evaluate(p, plan)
    one = sum(u.latency_at(1) for u in p.units)
    eight = sum(u.latency_at(8) for u in p.units)
    assert ev.step_batch == 8 and ev.round_ms == pytest.approx(eight, rel=1e-12)
    assert one < ev.round_ms < 8 * one
    assert ev.tokens_per_s == pytest.approx(8e3 / eight, rel=1e-12)
    # groups mode keeps its terms: batch 1 per group, the units as analysed at the workload's batch
    g = _problem({"prompt_tokens": 256, "max_new_tokens": 64, "batch_size": 1, "concurrency": 8})
    assert evaluate(g, plan).bottleneck_ms == pytest.approx(one, rel=1e-12)
