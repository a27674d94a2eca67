"""Weighing a re-plan: units moved, the switch's cost against the gain over a horizon, and hysteresis."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from noodle.serve.controller import ClusterController, plan_layout, predicted_tps
from noodle.serve.migration import SwitchCost, layout_under, moved_units, switch_cost, weigh
from noodle.serve.registry import ClusterRegistry

from .test_registry import _join


@dataclass(frozen=True)
class S:
    node: str
    start: int
    end: int


class Events:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def add(self, level: str, message: str) -> None:
        self.lines.append((level, message))


def test_moved_units_are_those_whose_node_changes() -> None:
    before = [S("a", 0, 2), S("b", 2, 4), S("c", 4, 6)]
    assert moved_units(before, before) == ()
    assert moved_units(before, [S("a", 0, 3), S("b", 3, 4), S("c", 4, 6)]) == (2,)
    assert moved_units(before, [S("c", 0, 2), S("b", 2, 4), S("a", 4, 6)]) == (0, 1, 4, 5)
    assert moved_units([], before) == (0, 1, 2, 3, 4, 5)


@pytest.mark.parametrize(("current", "best", "moved", "hold_s", "horizon", "switch", "why"), [
    (100.0, 105.0, (1,), 0.1, 120.0, False, "within the 10% threshold"),
    (100.0, 130.0, (1,), 0.1, 120.0, True, "+3597 tokens over 120 s for 10 lost"),
    (100.0, 130.0, (1,), 2.0, 4.0, False, "serve 60 more tokens but lose 200"),
    (100.0, 130.0, (), 0.1, 120.0, False, "is the current layout"),
    (0.0, 50.0, (0,), 1.0, 120.0, True, "tokens over 120 s"),
])  # fmt: skip
def test_weigh_needs_the_threshold_and_a_move_that_pays(current: float, best: float, moved: tuple[int, ...],
                                                        hold_s: float, horizon: float, switch: bool, why: str) -> None:  # fmt: skip
    v = weigh(current, best, SwitchCost(moved, 2**20 * len(moved), 0.0, hold_s), threshold=0.10, horizon_s=horizon)
    assert v.switch is switch and why in v.why
    assert v.lost_tokens == pytest.approx(current * hold_s if moved else 0.0)


def test_switch_cost_counts_the_bytes_of_moved_units_over_the_link() -> None:
    class Doc:
        def __init__(self, stages: list[S]) -> None:
            self.stages = stages

    before, after = Doc([S("a", 0, 2), S("b", 2, 4)]), Doc([S("a", 0, 1), S("b", 1, 4)])
    cost = switch_cost(before, after, [10**9, 10**9, 5, 5], bandwidth_gbps=8.0, hold_s=0.5)  # type: ignore[arg-type]
    assert cost.moved_units == (1,) and cost.moved_bytes == 10**9
    assert cost.load_s == pytest.approx(1.0) and cost.seconds == pytest.approx(1.5)


def _controller(model_dir: Path, nodes: int, **kw: Any) -> tuple[ClusterController, ClusterRegistry]:
    reg = ClusterRegistry()
    for i in range(1, nodes + 1):
        reg.join(_join(f"w{i}", 1.0))
    return ClusterController(reg, model_dir, Events(), token="t", concurrency=4, **kw), reg


def test_the_current_layout_is_reevaluated_with_fresh_figures(model_dir: Path) -> None:
    ctl, reg = _controller(model_dir, 3)
    plan = ctl.solve(reg.records())
    same = layout_under(ctl.problem(reg.records()), plan)
    assert same is not None and plan_layout(same) == plan_layout(plan)
    assert predicted_tps(same) == pytest.approx(predicted_tps(plan), rel=1e-6)
    for k, st in enumerate(plan.stages):  # the last stage's node runs 3x slower than its table now, the others as it
        reg.correct(st.node, st.start, st.end, 3.0 if k == len(plan.stages) - 1 else 1.0)
    slowed = layout_under(ctl.problem(reg.records()), plan)
    assert slowed is not None and predicted_tps(slowed) < 0.8 * predicted_tps(plan)
    gone = [r for r in reg.records() if r.id != plan.stages[0].node]
    assert layout_under(ctl.problem(gone), plan) is None


def test_a_join_is_weighed_against_the_move(model_dir: Path) -> None:
    ctl, reg = _controller(model_dir, 3)
    current = ctl.solve(reg.records())
    reg.join(_join("w4", 1.0))
    best = ctl.solve(reg.records())
    verdict = ctl._weigh(reg.records(), current, best)
    gain = predicted_tps(best) / predicted_tps(current) - 1
    assert verdict.gain == pytest.approx(gain, rel=1e-6)
    assert verdict.switch is (gain > ctl.gain_threshold and bool(verdict.cost.moved_units))
    assert verdict.cost.moved_units == moved_units(current.stages, best.stages)
    short = ClusterController(reg, model_dir, Events(), token="t", concurrency=4, horizon_s=1e-3)
    assert not short._weigh(reg.records(), current, best).switch  # no gain pays for a move within 1 ms
    strict = ClusterController(reg, model_dir, Events(), token="t", concurrency=4, gain_threshold=10.0)
    assert not strict._weigh(reg.records(), current, best).switch


def test_a_join_that_does_not_pay_keeps_the_plan_without_touching_the_pipeline(model_dir: Path) -> None:
    ctl, reg = _controller(model_dir, 3, gain_threshold=10.0)
    ctl.plan.current = ctl.solve(reg.records())
    reg.join(_join("w4", 0.25))  # 4x faster: a better plan exists, but not 10x better
    assert ctl._replan("nodes changed: 4 live") is False
    assert ctl.replans == [] and plan_layout(ctl.plan.current) == plan_layout(ctl.solve(reg.records()[:3]))
    assert any("keeping" in m and "threshold" in m for _, m in ctl.events.lines)


def test_a_pending_join_is_weighed_before_drift_and_drift_waits_for_it(model_dir: Path) -> None:
    from noodle.serve.drift import StageError

    ctl, reg = _controller(model_dir, 3)
    ctl.plan.current = ctl.solve(reg.records())
    ctl._considered = reg.version
    reg.take_changes()  # as the opener does after the first plan
    st = ctl.plan.current.stages[0]
    err = StageError(0, st.node, st.start, st.end, 2.0, 1.0, 2.0, 1.0, 1.0, 2.0, 3)
    ctl._windows = lambda plan: []  # type: ignore[method-assign]
    ctl.drift.observe = lambda windows, factors: ({}, [err])  # type: ignore[method-assign]
    calls: list[str] = []
    ctl._replan = lambda reason, **kw: calls.append(reason) or False  # type: ignore[method-assign,assignment,func-returns-value]
    ctl._drift = lambda plan, e: calls.append(f"drift {e.node}")  # type: ignore[method-assign]
    reg.join(_join("w4", 1.0))
    ctl._last_switch = time.monotonic()  # within the cooldown: the join waits, and so does drift
    ctl._tick()
    assert calls == []
    ctl._last_switch = 0.0
    ctl._drift_checked = 0.0
    ctl._tick()  # the join is weighed as a change of nodes, not under a drift reason
    assert calls == ["nodes changed: 4 live (w4 joined)"]
    ctl._drift_checked = 0.0
    ctl._tick()  # nothing pending now: drift acts
    assert calls == ["nodes changed: 4 live (w4 joined)", f"drift {st.node}"]
