"""The plan warns when its measured reference is far from what the stages then take (issue 20, item 6)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from noodle.plandoc import PlanDoc
from noodle.serve.reference import SAMPLES_NEEDED, ReferenceCheck, far_stages
from noodle.serve.runtime import Events


def _row(stage: int, planned: float, seen: float) -> dict[str, object]:
    return {"stage": stage, "node": f"n{stage}", "units": "embed..lm_head", "planned_ms": planned, "step_ms_p50": seen}


def test_far_means_beyond_2x_either_way_and_needs_a_measurement() -> None:
    rows = [_row(0, 2183.0, 616.0), _row(1, 10.0, 19.0), _row(2, 10.0, 25.0), _row(3, 10.0, 0.0)]
    assert [(r["stage"], round(x, 2)) for r, x in far_stages(rows)] == [(0, 0.28), (2, 2.5)]


def test_warns_once_per_stage_after_consecutive_samples_and_again_after_a_replan(
        caplog: pytest.LogCaptureFixture) -> None:
    events = Events()
    check = ReferenceCheck(lambda msg: events.add("warning", msg))
    plan_a, plan_b = object(), object()
    far = [_row(0, 2183.0, 616.0)]
    with caplog.at_level(logging.WARNING):
        for _ in range(SAMPLES_NEEDED - 1):
            assert check.observe(plan_a, far) == []
        assert check.observe(plan_a, [_row(0, 2183.0, 2000.0)]) == []  # a near sample breaks the streak
        given = [m for _ in range(SAMPLES_NEEDED + 2) for m in check.observe(plan_a, far)]
    assert len(given) == 1
    assert "616.0 ms" in given[0] and "2183.0 ms" in given[0] and "0.28x, faster" in given[0]
    assert [e["message"] for e in events.recent()] == given
    assert given[0] in caplog.text  # the event is a log line too
    assert [m for _ in range(SAMPLES_NEEDED) for m in check.observe(plan_b, far)] != []  # a new plan is judged anew


def test_a_served_plan_far_from_what_its_stages_take_warns(model_dir: Path, plan_doc: PlanDoc) -> None:
    """A real server whose plan says 1 s per step while the tiny model steps in milliseconds: an event says so."""
    import httpx
    from transformers import AutoTokenizer

    from noodle.serve.build import build_server
    from tests.serve.servers import app_server, slow_plan

    served = build_server(model_dir, slow_plan(plan_doc, 1000.0), AutoTokenizer.from_pretrained(model_dir))
    body = {"model": "gpt2-tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0}
    with app_server(served) as base:
        warned: list[str] = []
        deadline = time.monotonic() + 60
        while not warned and time.monotonic() < deadline:
            assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 200
            time.sleep(0.3)
            events = httpx.get(f"{base}/noodle/status", timeout=10).json()["events"]
            warned = [e["message"] for e in events if e["level"] == "warning" and e["message"].startswith("plan: ")]
    assert len(warned) == 1, warned
    assert "the plan predicted 1000.0 ms" in warned[0] and "faster" in warned[0]


def test_the_same_event_again_is_counted_not_repeated(caplog: pytest.LogCaptureFixture) -> None:
    """The status page's events do not flood: an identical event right after the last one counts on it."""
    events = Events()
    with caplog.at_level(logging.INFO):
        for ms in (0.2, 0.25, 0.21, 0.3, 0.2):
            events.add("info", f"links re-measured: a-b {ms} ms: keeping a[0:3) b[3:6)")
        events.add("info", "joined: w4")
        events.add("info", "joined: w5")  # names differ: two events
        events.add("info", "links re-measured: a-b 0.2 ms: keeping a[0:3) b[3:6)")
    got = [(e["message"][:6], e["repeats"]) for e in events.recent()]
    assert got == [("links ", 1), ("joined", 1), ("joined", 1), ("links ", 5)]
    assert events.recent()[-1]["message"] == "links re-measured: a-b 0.2 ms: keeping a[0:3) b[3:6)"  # the latest
    assert caplog.text.count("links re-measured") == 2  # one log line per shown event, the repeats at debug
