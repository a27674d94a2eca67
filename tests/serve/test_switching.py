"""The switching pipeline: requests submitted before, during and across a plan switch all finish, none fail."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from noodle.executors import EXECUTORS
from noodle.executors.scheduler import Completion
from noodle.plandoc import PlanDoc
from noodle.serve.switching import SwitchingPipeline

from .servers import slow_plan


def _opener(plan: PlanDoc, model_dir: Path, opened: list[Any]) -> Any:
    def open_() -> tuple[Any, Any]:
        ex = EXECUTORS.get("local")(plan, model_dir, emulate=True)
        ex.__enter__()
        opened.append(ex)
        return ex, ex.pipeline(concurrency=4, max_queue=64)

    return open_


def _submit(sp: SwitchingPipeline, prompt: list[int], n: int) -> tuple[threading.Event, list[Any], list[int]]:
    done, out, streamed = threading.Event(), [], []

    def fin(c: Completion) -> None:
        out.append(c)
        done.set()

    sp.submit(prompt, max_new_tokens=n, on_token=streamed.append, on_done=fin)
    return done, out, streamed


def test_switch_drains_requeues_and_keeps_greedy_tokens(model_dir: Path, plan_doc: PlanDoc, reference: Any) -> None:
    slow = slow_plan(plan_doc, 20.0)  # 20 ms a step: requests are still running when the switch begins
    opened: list[Any] = []
    sp = SwitchingPipeline(max_queue=64)
    held = _submit(sp, [1, 2, 3], 4)  # before anything is open: held, not failed
    sp.switch_to(_opener(slow, model_dir, opened), drain_s=0.0)
    assert held[0].wait(30) and held[1][0].finish_reason == "length"
    prompts = [[5 + i, 7, 9] for i in range(6)]
    running = [_submit(sp, p, 24) for p in prompts]
    time.sleep(0.3)  # some tokens are out
    assert any(r[2] for r in running)
    times = sp.switch_to(_opener(slow, model_dir, opened), drain_s=0.05)  # drain bound passes: cancel + requeue
    late = _submit(sp, [4, 4, 4], 6)
    for done, out, streamed in [*running, late]:
        assert done.wait(60)
        assert out[0].finish_reason == "length", out[0]
        assert out[0].tokens == streamed
    for p, (_, out, _) in zip(prompts, running):
        assert out[0].tokens == reference(p, 24)[: len(out[0].tokens)] and len(out[0].tokens) == 24
    assert sp.requeued >= 1 and times["drain_s"] >= 0.05
    assert len(opened) == 2
    sp.close(1.0)


def test_close_finishes_held_requests(model_dir: Path) -> None:
    sp = SwitchingPipeline(max_queue=2)
    done, out, _ = _submit(sp, [1, 2], 3)
    sp.close(0.0)
    assert done.wait(5) and out[0].finish_reason == "cancelled"
    assert not sp.accepting
