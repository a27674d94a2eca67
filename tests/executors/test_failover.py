"""Failover planning: retry delays, and merging a dead node's stage into a neighbour with room."""

from __future__ import annotations

import pytest

from noodle.errors import ExecutorError, SpecError
from noodle.executors.failover import RetryPolicy, merge_stage, merge_target
from noodle.plandoc import PlanDoc

from .conformance import make_plan

UNITS = ["embed", "block.0", "block.1", "block.2", "block.3", "lm_head"]


def plan_with_memory(required: list[float], available: list[float]) -> PlanDoc:
    plan = make_plan(UNITS, [("a", 0, 2), ("b", 2, 4), ("c", 4, 6)], compute_ms=2.0)
    stages = [s.model_copy(update={"memory_required_mb": r, "memory_available_mb": m, "hop_ms": 0.5 * (i + 1),
                                   "expected_latency_ms": 2.0 + 0.5 * (i + 1)})
              for i, (s, r, m) in enumerate(zip(plan.stages, required, available))]  # fmt: skip
    return plan.model_copy(update={"stages": stages})


def test_retry_policy_backs_off_and_checks_its_numbers():
    assert RetryPolicy(attempts=4, backoff_s=0.1).delays() == pytest.approx([0.1, 0.2, 0.4])
    assert RetryPolicy(attempts=1).delays() == []
    with pytest.raises(SpecError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(SpecError, match="step_timeout_s"):
        RetryPolicy(step_timeout_s=0)


def test_merge_picks_the_neighbour_with_most_room():
    plan = plan_with_memory([100, 100, 100], [150, 1000, 400])
    assert merge_target(plan, 1) == 2  # a would need 200 of 150; c has 200 left
    merged = merge_stage(plan, 1)
    assert [(s.node, s.start, s.end) for s in merged.stages] == [("a", 0, 2), ("c", 2, 6)]
    assert [s.stage_id for s in merged.stages] == [0, 1]
    mid = merged.stages[1]
    assert mid.compute_ms == 4.0 and mid.hop_ms == 1.5 and mid.memory_required_mb == 200
    assert mid.layers == UNITS[2:]
    assert merged.predicted.token_latency_ms == pytest.approx(2.5 + 5.5)
    assert "not re-solved" in merged.solver.note and merged.solver.status == "feasible"
    assert [n.id for n in merged.nodes] == ["a", "c"]


def test_merge_into_the_previous_stage():
    plan = plan_with_memory([100, 100, 100], [1000, 1000, 150])
    merged = merge_stage(plan, 2)
    assert [(s.node, s.start, s.end) for s in merged.stages] == [("a", 0, 2), ("b", 2, 6)]
    assert merged.stages[1].hop_ms == 1.5  # the dead last stage's hop: the token back


def test_no_room_anywhere_names_the_numbers():
    plan = plan_with_memory([100, 300, 100], [150, 1000, 350])
    with pytest.raises(ExecutorError, match=r"a would need 400 MiB.*has 150 MiB.*c would need 400 MiB.*has 350 MiB"):
        merge_target(plan, 1)
    single = make_plan(UNITS, [("a", 0, 6)])
    with pytest.raises(ExecutorError, match="only stage"):
        merge_target(single, 0)
