"""What a Kubernetes cluster does to workers, on real processes: rolling update, reschedule, scale-up.

A pod is stopped with SIGTERM and (rescheduled, or updated) started again under its stable name
(a StatefulSet's ``pod-N``). The worker leaves on SIGTERM: the coordinator takes it out of the plan
at once and the worker keeps computing until the coordinator serves without it, so a rolling update
(one pod at a time, the next one stopped only when the previous one has joined again, as a
readiness probe makes Kubernetes wait) never leaves a request without a stage. The heartbeat
timeout is set far beyond the test's steps: a re-plan that waited for missed heartbeats would show.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.cluster import PROMPT, ClusterLab, Load, measure_cache, wait_for

pytestmark = pytest.mark.slow

HEARTBEAT_TIMEOUT_S = 120  # a re-plan that came from missed heartbeats would take this long


def _node(lab: ClusterLab, name: str) -> dict[str, Any]:
    return next((n for n in lab.cluster()["nodes"] if n["id"] == name), {})


def _ready(lab: ClusterLab, name: str) -> bool:
    """Joined, alive and timed (what a readiness probe on the worker would wait for)."""
    node = _node(lab, name)
    return bool(node.get("alive") and node.get("verified"))


def _in_plan(lab: ClusterLab, name: str) -> bool:
    return bool(lab.holder(name))


def _stop_pod(lab: ClusterLab, name: str) -> tuple[float, str]:
    """SIGTERM, as the kubelet sends it; returns (seconds to exit, the worker's last lines)."""
    proc = lab.workers[name]
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=90)
    log = lab.log(name)
    assert code == 0, log[-2000:]
    return time.time() - t0, log


def test_rolling_update_reschedule_and_scale_up(model_dir: Path, tmp_path: Path, tokenizer: Any,
                                                reference: Callable[..., list[int]]) -> None:  # fmt: skip
    cache = measure_cache(model_dir, tmp_path / "costs").parent
    expected = str(tokenizer.decode(reference(list(tokenizer(PROMPT)["input_ids"]), 12), skip_special_tokens=True))
    args = ["--min-workers", "2", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S), "--concurrency", "4"]
    with ClusterLab(model_dir, tmp_path / "lab", args) as lab:
        ready = {n: tmp_path / f"{n}.ready" for n in ("pod-0", "pod-1", "pod-2")}  # what the readiness probe tests
        for name in ("pod-0", "pod-1"):
            lab.worker(name, cache, "--ready-file", str(ready[name]))
        lab.wait_ready()
        for name in ("pod-0", "pod-1"):
            wait_for(lambda n=name: _ready(lab, n), 180, f"{name} to be timed and planned")  # type: ignore[misc]
        with Load(lab.base, clients=2) as load:
            wait_for(lambda: len(load.done) >= 2, 180, "requests to flow")
            # rolling update: one pod at a time leaves and comes back under its name before the next one goes
            for name in ("pod-0", "pod-1"):
                held = _in_plan(lab, name)
                t_stop = time.time()
                assert ready[name].exists()
                took_s, log = _stop_pod(lab, name)
                assert not ready[name].exists()
                assert "it serves without this worker" in log or not held, log[-2000:]
                assert not _node(lab, name).get("alive"), f"{name} still alive after it left"
                if held:
                    left = [r for r in lab.replans(since=t_stop - 1) if name not in r["after"]]
                    assert left, lab.cluster()["replans"]
                    assert left[0]["t"] - t_stop < HEARTBEAT_TIMEOUT_S / 2  # the leave, not a missed heartbeat
                assert not _in_plan(lab, name)
                done_before = len(load.done)
                lab.worker(name, cache, "--ready-file", str(ready[name]))  # rescheduled: the same name, right away
                wait_for(lambda n=name: _ready(lab, n) and ready[n].exists(), 180, f"{name} to rejoin")  # type: ignore[misc]
                assert [e for e in lab.events() if e["t"] > t_stop and e["message"].startswith(f"node {name} joined from")]
                # its join is weighed before the next pod stops (a re-plan in flight would move stages meanwhile)
                wait_for(lambda n=name, t=t_stop: [r for r in lab.replans(since=t) if f"{n} joined" in r["reason"]]
                         or [e for e in lab.events() if e["t"] > t and "keeping" in e["message"]],
                         120, f"{name}'s join to be weighed")  # fmt: skip
                wait_for(lambda d=done_before: len(load.done) > d, 180, "requests after the rejoin")  # type: ignore[misc]
                print(f"\n{name}: {'held a stage' if held else 'spare'}; SIGTERM -> exited {took_s:.2f} s; "
                      f"rejoined as a join ({_node(lab, name).get('joined_at', 0) - t_stop:.1f} s after the stop)")
            # scale-up: a third pod joins and is weighed as a join
            t_join = time.time()
            lab.worker("pod-2", cache)
            wait_for(lambda: _ready(lab, "pod-2"), 180, "pod-2 to join")
            wait_for(lambda: [r for r in lab.replans(since=t_join) if "pod-2 joined" in r["reason"]]
                     or [e for e in lab.events() if e["t"] > t_join and "keeping" in e["message"]],
                     120, "pod-2's join to be weighed (a re-plan onto it, or kept with a reason)")  # fmt: skip
            wait_for(lambda: len(load.done) >= 8, 180, "more requests")
        assert load.errors == [], load.errors
        assert load.texts() == {expected}
