"""``noodle worker --emulate-slowdown F --slowdown-after-s T``: an honest emulated throttle (test/demo knob)."""

from __future__ import annotations

import math

import pytest
import torch

from noodle.cli.main import main
from noodle.errors import SpecError
from noodle.executors.grpc import stage_service_pb2 as pb
from noodle.executors.grpc.throttle import Throttle
from noodle.executors.grpc.wire import from_proto, to_proto
from noodle.executors.grpc.worker import WorkerConfig

from .test_grpc_worker import Server, forward


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_throttle_sleeps_factor_minus_one_times_the_step_after_the_delay(capsys):
    clock, slept = Clock(), []
    th = Throttle(4.0, 10.0, clock=clock, sleep=slept.append)
    th.after_step(0.002)  # the first step starts the delay
    clock.t += 9.9
    th.after_step(0.002)
    assert slept == [] and not th.active()
    clock.t += 0.2
    th.after_step(0.002)
    th.after_step(0.010)
    assert slept == pytest.approx([0.006, 0.030])
    out = capsys.readouterr().out
    assert out.count("emulated slowdown ON") == 1 and "4x" in out
    off = Throttle(1.0, 0.0, clock=clock, sleep=slept.append)
    off.after_step(1.0)
    assert len(slept) == 2 and not off.enabled


def test_the_coordinators_join_probe_does_not_start_a_mid_run_throttle() -> None:
    clock, slept = Clock(), []
    later = Throttle(4.0, 10.0, clock=clock, sleep=slept.append)
    later.after_step(0.002, starts_clock=False)  # the timed probe at join
    clock.t += 20.0
    later.after_step(0.002)  # the first served step starts the 10 s now
    assert slept == [] and not later.active()
    clock.t += 10.0
    later.after_step(0.002, starts_clock=False)  # once on, the probe is slowed like any step
    assert slept == pytest.approx([0.006])
    at_once = Throttle(4.0, 0.0, clock=clock, sleep=slept.append)
    at_once.after_step(0.002, starts_clock=False)  # a slow device from the start is slow in the probe too
    assert slept == pytest.approx([0.006, 0.006])


@pytest.mark.parametrize(("factor", "after", "message"), [
    (0.5, 0.0, "--emulate-slowdown: must be a finite factor in [1, 1000]"),
    (math.nan, 0.0, "--emulate-slowdown"),
    (math.inf, 0.0, "--emulate-slowdown"),
    (2.0, -1.0, "--slowdown-after-s: must be a finite number of seconds"),
    (2.0, math.inf, "--slowdown-after-s"),
])  # fmt: skip
def test_bad_settings_are_refused(tiny_models, factor, after, message):
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        WorkerConfig(model_dir=tiny_models["gpt2"], emulate_slowdown=factor, slowdown_after_s=after).check()


@pytest.mark.parametrize("args", [["--emulate-slowdown", "0.9"], ["--emulate-slowdown", "nan"],
                                  ["--slowdown-after-s", "-2"], ["--emulate-slowdown", "2", "--backend", "torchrpc"]])
def test_cli_refuses_in_one_line(tiny_models, capsys, args):
    assert main(["worker", "--model", str(tiny_models["gpt2"]), "--port", "0", *args]) == 2
    err = capsys.readouterr().err
    assert "noodle: error: --" in err and "Traceback" not in err


def _steps(server: Server) -> tuple[list[torch.Tensor], list[float]]:
    stage = server.stub.LoadStage(pb.LoadStageRequest(start=0, end=6), timeout=60).stage.stage_id
    server.stub.CreateSession(pb.CreateSessionRequest(stage_id=stage, session="s"), timeout=10)
    outs = [server.stub.Forward(forward("s", to_proto(torch.tensor([[5, 17, 99, 3]]))), timeout=30)]
    for tok in (7, 8, 9):
        outs.append(server.stub.Forward(forward("s", to_proto(torch.tensor([[tok]])), prefill=False), timeout=30))
    return [from_proto(o.data, field="data") for o in outs], [(o.t_out_ns - o.t_in_ns) / 1e9 for o in outs]


def test_a_throttled_worker_computes_the_same_numbers_and_sleeps_in_the_step(tiny_models, capsys):
    plain = Server(tiny_models["gpt2"])
    try:
        want, _ = _steps(plain)
    finally:
        plain.close()
    slow = Server(tiny_models["gpt2"], emulate_slowdown=3.0, slowdown_after_s=0.0)
    slept: list[float] = []
    real_sleep = slow.servicer.throttle._sleep
    slow.servicer.throttle._sleep = lambda s: (slept.append(s), real_sleep(s))  # type: ignore[assignment]
    try:
        got, step_s = _steps(slow)
    finally:
        slow.close()
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert len(slept) == 4 and all(s > 0 for s in slept)
    # the sleep lies inside each step's own timing (what the coordinator sees)
    assert all(t >= s for t, s in zip(step_s, slept))
    assert "emulated slowdown ON" in capsys.readouterr().out
