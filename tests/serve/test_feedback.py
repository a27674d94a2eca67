"""Adaptive costs on a loopback cluster: the stages' measured compute corrects the join-time unit costs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from noodle.executors.generation import Sampling


def test_corrected_estimate_converges_on_a_loopback_cluster(model_dir: Path, tmp_path: Path) -> None:
    from noodle.executors.grpc.config import WorkerConfig
    from noodle.executors.grpc.server import serve
    from noodle.executors.slicing import unit_names_of
    from noodle.serve.controller import ClusterController
    from noodle.serve.joining import self_report
    from noodle.serve.registry import ClusterRegistry, JoinRequest, table_ms
    from noodle.serve.runtime import Events

    report = self_report(model_dir, "cpu", tmp_path)  # the worker's own measurement, as on join
    reg = ClusterRegistry(heartbeat_timeout_s=3600, unit_names=tuple(unit_names_of(model_dir)))
    servers = []
    # thresholds no window reaches: this test watches the estimate converge on one layout, not re-plans (on a
    # loaded box a window can be 1.5x off and move the stage, which restarts its windows)
    ctl = ClusterController(reg, model_dir, Events(), token=None, concurrency=2, min_workers=3, drift_threshold=50.0,
                            gain_threshold=50.0)  # fmt: skip
    ctl.drift.min_steps = 10
    history: list[dict[int, Any]] = []
    observe = ctl.drift.observe

    def recording(windows: Any, factors: Any) -> Any:
        out = observe(windows, factors)
        if windows:
            history.append(dict(ctl.drift.errors))
        return out

    ctl.drift.observe = recording  # type: ignore[method-assign]
    try:
        for i in range(3):
            server, _, port = serve(WorkerConfig(model_dir=model_dir, port=0))
            servers.append(server)
            reg.join(JoinRequest.model_validate({"id": f"w{i}", "address": f"127.0.0.1:{port}", **report}))
        pipe, _ = ctl.opener()
        for _ in range(5):  # 10 requests, two at a time
            tickets = [pipe.submit([11, 22, 33, 44, 55, 66, 77, 88], max_new_tokens=24, sampling=Sampling())
                       for _ in range(2)]  # fmt: skip
            for t in tickets:
                assert t.finished.wait(120)
            time.sleep(1.1)  # one feedback look per pair
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(history) < 4:
            time.sleep(0.2)
        assert len(history) >= 4, history
        stages = sorted(history[-1])
        assert stages == list(range(len(ctl.plan.current.stages)))
        for i in stages:
            first = next(h[i] for h in history if i in h)
            last = history[-1][i]
            steps = [h[i].factor for h in history if i in h]
            assert last.windows >= 4
            rec = next(r for r in reg.records() if r.id == last.node)
            # the table at the plan's step batch (continuous batching of 2 streams), along the model's batch curve
            assert last.batch == (ctl.plan.current.predicted.step_batch or 1)
            assert last.corrected_ms == pytest.approx(table_ms(rec, last.start, last.end, last.batch, ctl.units)
                                                      * last.factor)  # fmt: skip
            assert rec.corrections[-1] == (last.start, last.end, pytest.approx(last.factor))
            print(f"stage {i}: factor {[round(f, 3) for f in steps]}, error vs table {first.corrected_error:+.1%}, "
                  f"corrected estimate error {[round(h[i].corrected_error, 3) for h in history if i in h]}")
            # How well the correction predicts the next window depends on the machine's load from one window to the
            # next (seen 0.39 -> 0.70 at load 8 in CI): printed above, measured in bench/cluster_accuracy.py, not
            # asserted here. What is asserted is the mechanism: every factor is a finite positive median ratio.
            assert all(0 < f < 1e3 for f in steps), steps
    finally:
        ctl.pipeline.close(5.0)
        ctl.close()
        if ctl.pipeline.executor is not None:
            ctl.pipeline.executor.__exit__(None, None, None)
        for s in servers:
            s.stop(0)


def test_a_worker_reporting_itself_faster_than_it_answers_is_judged_by_what_is_observed(model_dir: Path,
                                                                                        tmp_path: Path) -> None:  # fmt: skip
    """The worker's replies claim 1 us of compute per step; the coordinator's own clock sees the step take far
    longer, and the node's table is corrected by that, not by the report (issue 24, item 1)."""
    from noodle.executors.grpc.config import WorkerConfig
    from noodle.executors.grpc.server import serve
    from noodle.executors.slicing import unit_names_of
    from noodle.serve.controller import ClusterController
    from noodle.serve.joining import self_report
    from noodle.serve.registry import ClusterRegistry, JoinRequest
    from noodle.serve.runtime import Events

    report = self_report(model_dir, "cpu", tmp_path)
    reg = ClusterRegistry(heartbeat_timeout_s=3600, unit_names=tuple(unit_names_of(model_dir)))
    ctl = ClusterController(reg, model_dir, Events(), token=None, concurrency=1, min_workers=1, drift_threshold=50.0,
                            gain_threshold=50.0)  # fmt: skip
    ctl.drift.min_steps = 10
    server, servicer, port = serve(WorkerConfig(model_dir=model_dir, port=0))
    honest_forward = servicer._forward

    def lying_forward(req: Any) -> Any:
        reply = honest_forward(req)
        time.sleep(0.004)  # a step that really takes 4 ms more than it says
        reply.t_out_ns = reply.t_in_ns + 1000
        return reply

    servicer._forward = lying_forward  # type: ignore[method-assign]
    try:
        reg.join(JoinRequest.model_validate({"id": "w0", "address": f"127.0.0.1:{port}", **report}))
        pipe, _ = ctl.opener()
        for _ in range(3):
            ticket = pipe.submit([11, 22, 33, 44], max_new_tokens=24, sampling=Sampling())
            assert ticket.finished.wait(120)
            time.sleep(1.1)  # one feedback look per request
        rec = reg.records()[0]
        assert rec.corrections, "no feedback window was taken"
        table = sum(rec.profile.latency_ms) + rec.profile.step_overhead_ms
        factor = rec.corrections[-1][2]
        print(f"table {table:.3f} ms, corrected x{factor:.2f} to {table * factor:.3f} ms (reported: 0.001 ms)")
        assert table * factor >= 4.0 * 0.9  # at least the 4 ms it hid, not 0.001 ms x the table's units
    finally:
        ctl.pipeline.close(5.0)
        ctl.close()
        if ctl.pipeline.executor is not None:
            ctl.pipeline.executor.__exit__(None, None, None)
        server.stop(0)
