"""The grpc coordinator when workers start late, restart, hang or fill up with a dead coordinator's sessions."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from noodle.executors.grpc import stage_service_pb2 as pb
from noodle.executors.grpc import stage_service_pb2_grpc as pb_grpc
from noodle.executors.grpc.coordinator import STEP_TIMEOUT_FLOOR_S, GrpcExecutor, step_timeout
from noodle.executors.grpc.server import serve
from noodle.executors.grpc.wire import to_proto
from noodle.executors.grpc.worker import WorkerConfig
from noodle.plandoc import StageDoc

from .conformance import CUTS, PROMPT_SETS, plan_for, reference
from .procs import WorkerPool, children

TOKEN = "recovery-token-21b0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(model, port: int = 0, **kw):
    return serve(WorkerConfig(model_dir=model, port=port, **kw))


def _stop(started) -> None:
    server, servicer, _ = started
    server.stop(0).wait(5)
    servicer.close()


def test_first_health_check_is_retried_while_the_worker_starts(tiny_models):
    model = tiny_models["llama"]
    port = _free_port()
    plan = plan_for(model, CUTS["1-stage"])
    later: list = []
    timer = threading.Timer(1.5, lambda: later.append(_start(model, port)))
    timer.start()
    try:
        with GrpcExecutor(plan, model, workers={"node0": f"127.0.0.1:{port}"}) as ex:  # nothing listens for 1.5 s
            tokens = ex.generate(PROMPT_SETS["batch1"], max_new_tokens=3).tokens
        assert tokens == reference(model, PROMPT_SETS["batch1"], 3)[0]
    finally:
        timer.join()
        for started in later:
            _stop(started)


def test_reused_executor_reloads_its_stages_after_the_worker_restarted(tiny_models):
    model = tiny_models["llama"]
    first = _start(model)
    port = first[2]
    addr = f"127.0.0.1:{port}"
    plan = plan_for(model, CUTS["rest|head"])
    want = reference(model, PROMPT_SETS["padded"], 4)[0]
    second = None
    notes: list[str] = []
    try:
        with GrpcExecutor(plan, model, workers={"node0": addr, "node1": addr}, log=notes.append) as ex:
            assert ex.generate(PROMPT_SETS["padded"], max_new_tokens=4).tokens == want
            _stop(first)
            first = None
            second = _start(model, port)  # same address, no stage loaded
            assert ex.generate(PROMPT_SETS["padded"], max_new_tokens=4).tokens == want
            assert len(second[1].stages) == 2
            with ex.pipeline(concurrency=2) as pipe:  # the lanes, after one more restart
                _stop(second)
                second = _start(model, port)
                got = [h.result(timeout=120).tokens for h in [pipe.submit(p, max_new_tokens=4) for p in PROMPT_SETS["batch1"] * 2]]
        alone = reference(model, PROMPT_SETS["batch1"], 4)[0][0]
        assert all(g[: len(alone)] == alone[: len(g)] for g in got)
    finally:
        for started in (first, second):
            if started is not None:
                _stop(started)


def test_at_the_session_cap_the_idlest_session_is_reaped(tiny_models):
    model = tiny_models["llama"]
    assert WorkerConfig(model_dir=model).idle_timeout_s == 60.0  # a dead coordinator's sessions go within a minute
    server, servicer, port = _start(model, max_sessions=2, evict_idle_s=0.3)
    try:
        stub = pb_grpc.StageServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        stage = stub.LoadStage(pb.LoadStageRequest(start=0, end=6), timeout=60).stage.stage_id
        for sid in ("one", "two"):
            stub.CreateSession(pb.CreateSessionRequest(stage_id=stage, session=sid), timeout=5)
        with pytest.raises(grpc.RpcError) as err:  # both just used: refused
            stub.CreateSession(pb.CreateSessionRequest(stage_id=stage, session="three"), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        time.sleep(0.4)
        stub.Forward(pb.ForwardRequest(session="two", data=to_proto(torch.tensor([[5, 6]])), prefill=True), timeout=30)
        stub.CreateSession(pb.CreateSessionRequest(stage_id=stage, session="three"), timeout=5)  # "one" makes room
        assert sorted(servicer.sessions) == ["three", "two"]
    finally:
        _stop((server, servicer, port))


def test_step_timeout_comes_from_the_plan():
    doc = StageDoc(stage_id=0, node="n", device="cpu", layers=["embed"], start=0, end=1, compute_ms=400.0, hop_ms=100.0,
                   expected_latency_ms=500.0, memory_required_mb=1.0, memory_available_mb=2.0, rationale="")  # fmt: skip
    decode = to_proto(torch.zeros(4, 1, dtype=torch.long))
    assert step_timeout(doc, decode, planned_batch=4) == pytest.approx(10.0)  # 20 x 0.5 s
    assert step_timeout(doc, to_proto(torch.zeros(4, 30, dtype=torch.long)), planned_batch=4) == pytest.approx(300.0)
    assert step_timeout(doc, to_proto(torch.zeros(8, 1, dtype=torch.long)), planned_batch=4) == pytest.approx(20.0)
    fast = doc.model_copy(update={"expected_latency_ms": 1.0})
    assert step_timeout(fast, decode, planned_batch=4) == STEP_TIMEOUT_FLOOR_S


@pytest.fixture(scope="module")
def pool(tiny_models, spawner) -> Iterator[WorkerPool]:
    before = {p.pid for p in children()}
    p = WorkerPool(tiny_models["llama"], 3, cli=0, token=TOKEN)
    try:
        yield p
    finally:
        p.close()
    assert not [c for c in children() if c.pid not in before], "worker processes left behind"


def test_sigstopped_worker_is_detected_in_seconds_without_a_step_timeout(tiny_models, pool):
    model = tiny_models["llama"]
    a, b, c = pool.workers
    plan = plan_for(model, CUTS["embed|rest"])  # 1 ms a step planned: 2 s deadline (the floor)
    want = reference(model, PROMPT_SETS["batch1"], 6)[0]

    def stop_b(step: int) -> None:
        if step == 2:
            b.proc.send_signal(signal.SIGSTOP)

    try:
        with GrpcExecutor(plan, model, workers={"node0": a.address, "node1": b.address}, spares=[c.address],
                          token=TOKEN, log=lambda _: None) as ex:  # no policy: deadlines from the plan
            t0 = time.monotonic()
            res = ex.generate(PROMPT_SETS["batch1"], max_new_tokens=6, on_step=stop_b)
            wall = time.monotonic() - t0
    finally:
        b.kill()
    assert res.tokens == want
    (ev,) = res.report.failovers
    assert ev.action == "spare" and f"no reply within {STEP_TIMEOUT_FLOOR_S:g} s" in ev.reason
    assert wall < 20, f"hang found after {wall:.1f} s"
