"""Drift under continuous batching: each decode step is compared at the plan's step batch, not at batch 1."""

from __future__ import annotations

import statistics
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest

from noodle.serve.registry import ClusterRegistry, table_ms
from tests.serve.test_registry import _join

BATCHES = (1, 2, 3, 8)  # what a stage steps while streams come and go


def _controller(model_dir: Path, batching: str):
    from noodle.serve.controller import ClusterController
    from noodle.serve.runtime import Events

    reg = ClusterRegistry()
    for n in ("a", "b"):
        reg.join(_join(n, [0.05, 1.0, 1.0, 1.0, 1.0, 0.05]))  # measured at batch 1 only, as workers join
    ctl = ClusterController(reg, model_dir, Events(), token=None, concurrency=8, batching=batching)
    plan = ctl.solve(reg.records())
    return ctl, reg, plan


def _serve(ctl, reg, plan, slow: dict[int, float], batches=BATCHES, steps: int = 24) -> list:
    """Give every stage ``steps`` decode steps at ``batches`` (cycled), each ``slow[i]`` x the node's table at its
    batch, as a fake executor's lanes; returns the controller's windows."""
    recs = {r.id: r for r in reg.records()}
    lanes = []
    for i, st in enumerate(plan.stages):
        log = deque((slow.get(i, 1.0) * table_ms(recs[st.node], st.start, st.end, b, ctl.units), b)
                    for b in (batches[k % len(batches)] for k in range(steps)))  # fmt: skip
        lanes.append(SimpleNamespace(decode_steps=steps, decode_log=log))
    ctl.pipeline._exec = SimpleNamespace(_lanes=lanes)
    return ctl._windows(plan)


def test_steps_at_other_batches_are_brought_to_the_plans_step_batch(model_dir: Path) -> None:
    ctl, reg, plan = _controller(model_dir, "continuous")
    ref = plan.predicted.step_batch
    assert plan.predicted.streams == 8 and ref == -(-8 // len(plan.stages))
    windows = _serve(ctl, reg, plan, {0: 1.3})
    assert [w.index for w in windows] == list(range(len(plan.stages)))
    recs = {r.id: r for r in reg.records()}
    for w, st in zip(windows, plan.stages):
        assert w.batch == ref
        # the table at the step batch is what the planner priced the stage at (batch curve and all)
        assert w.table_ms == pytest.approx(st.compute_ms, rel=1e-9) == pytest.approx(w.predicted_ms, rel=1e-9)
        want = 1.3 if w.index == 0 else 1.0
        assert w.measured_ms == pytest.approx(want * w.table_ms, rel=1e-9)
        # compared raw, the steps' median would be read as an error the stage does not have
        raw = statistics.median(table_ms(recs[st.node], st.start, st.end, b, ctl.units) for b in BATCHES * 6)
        assert abs(raw / w.table_ms - 1) > 0.05
    updates, drifted = ctl.drift.observe(windows, reg.factors())
    assert updates[(plan.stages[0].node, plan.stages[0].start, plan.stages[0].end)] == pytest.approx(1.3)
    assert all(f == pytest.approx(1.0) for k, f in updates.items() if k[1] != 0)
    assert ctl.drift.errors[0].error == pytest.approx(0.3) and ctl.drift.errors[0].batch == ref
    assert ctl.drift.errors[0].as_dict()["batch"] == ref


def test_a_window_only_counts_fresh_steps_and_groups_compare_at_one_sequence(model_dir: Path) -> None:
    ctl, reg, plan = _controller(model_dir, "groups")
    assert plan.predicted.streams is None and plan.predicted.step_batch is None
    windows = _serve(ctl, reg, plan, {}, batches=(1,))
    assert windows and all(w.batch == 1 and w.measured_ms == pytest.approx(w.table_ms, rel=1e-9) for w in windows)
    lanes = ctl.pipeline._exec._lanes
    assert ctl._windows(plan) == []  # decode_steps did not move since the last look
    lanes[0].decode_steps += ctl.drift.min_steps
    assert [w.index for w in ctl._windows(plan)] == [0]
