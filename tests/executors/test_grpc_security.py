"""The gRPC worker against hostile or broken callers: stalled calls, big bodies, garbage, bad positions.

In-process servers for what the server object shows; ``noodle worker`` subprocesses where the
process itself is measured (RSS, exit on SIGTERM).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
import torch

from noodle.executors.grpc import stage_service_pb2 as pb
from noodle.executors.grpc import stage_service_pb2_grpc as pb_grpc
from noodle.executors.grpc.wire import to_proto

from .inprocess import Server

TOKEN = "sec-token-5d1e"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SERVICE = "/noodle.stage.v1.StageService/"
_LINE = re.compile(r"serving grpc on (\S+):(\d+)")


class Stalled:
    """Calls whose request never arrives: their request iterators block until :meth:`release`."""

    def __init__(self) -> None:
        self._go = threading.Event()
        self.calls: list[grpc.Future] = []
        self.done: list[threading.Event] = []

    def _never(self) -> Iterator[bytes]:
        self._go.wait()
        yield from ()

    def open(self, channel: grpc.Channel, method: str, *, metadata: tuple = (), streaming: bool = False) -> None:
        raw = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
        if streaming:
            call = channel.stream_stream(SERVICE + method, **raw)(self._never(), metadata=metadata, timeout=60)
        else:
            call = channel.stream_unary(SERVICE + method, **raw).future(self._never(), metadata=metadata, timeout=60)
        ended = threading.Event()
        call.add_done_callback(lambda _c: ended.set())
        self.calls.append(call)
        self.done.append(ended)

    def wait_ended(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        return sum(e.wait(max(deadline - time.monotonic(), 0)) for e in self.done)

    def release(self) -> None:
        self._go.set()
        for c in self.calls:
            c.cancel()


def eventually(check, timeout_s: float = 5.0) -> bool:
    """``check()`` became true within ``timeout_s`` (a slot is released just after its reply is sent)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def prefill(stub: pb_grpc.StageServiceStub, session: str, ids: torch.Tensor, *, metadata: tuple = AUTH,
            prefill_: bool = True) -> pb.ForwardReply:  # fmt: skip
    req = pb.ForwardRequest(session=session, data=to_proto(ids), prefill=prefill_)
    return stub.Forward(req, timeout=30, metadata=metadata)


def open_session(stub: pb_grpc.StageServiceStub, start: int, end: int, session: str, metadata: tuple = AUTH) -> str:
    stage = stub.LoadStage(pb.LoadStageRequest(start=start, end=end), timeout=60, metadata=metadata).stage.stage_id
    stub.CreateSession(pb.CreateSessionRequest(stage_id=stage, session=session), timeout=10, metadata=metadata)
    return stage


def test_authenticated_calls_succeed_while_50_unauthenticated_calls_stall(tiny_models):
    s = Server(tiny_models["llama"], token=TOKEN, max_sessions=2)
    stalled = Stalled()
    channels = [grpc.insecure_channel(s.address) for _ in range(5)]
    try:
        for i in range(50):
            stalled.open(channels[i % 5], ("Forward", "ForwardStream", "LoadStage")[i % 3], streaming=i % 3 == 1)
        time.sleep(0.5)
        t0 = time.monotonic()
        assert s.stub.Health(pb.HealthRequest(), timeout=5, metadata=AUTH).status == "serving"
        open_session(s.stub, 0, 6, "a")
        reply = prefill(s.stub, "a", torch.tensor([[5, 17, 99]]))
        assert tuple(reply.data.shape) == (1, 1, 512) and time.monotonic() - t0 < 10
        # every stalled call was refused from its metadata, without waiting for its body
        assert stalled.wait_ended(10) == 50
        assert {c.code() for c in stalled.calls} == {grpc.StatusCode.UNAUTHENTICATED}
        assert s.servicer.gate.refused_unauthenticated == 50
        assert eventually(lambda: s.servicer.gate.in_progress() == 0)
    finally:
        stalled.release()
        for c in channels:
            c.close()
        s.close()


def test_idle_authenticated_streams_are_capped_per_caller_and_closed(tiny_models):
    s = Server(tiny_models["llama"], token=TOKEN, max_sessions=2, stream_idle_s=1.0)
    stalled = Stalled()
    try:
        per_peer = s.servicer.limits.max_calls_per_peer
        for _ in range(per_peer):
            stalled.open(s.channel, "ForwardStream", metadata=AUTH, streaming=True)
        time.sleep(0.3)
        assert s.servicer.gate.in_progress() == per_peer
        assert s.stub.Health(pb.HealthRequest(), timeout=5, metadata=AUTH).status == "serving"  # outside the caps
        with pytest.raises(grpc.RpcError) as err:
            s.stub.LoadStage(pb.LoadStageRequest(start=0, end=6), timeout=5, metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "per-caller limit" in err.value.details()
        assert stalled.wait_ended(5) == per_peer  # closed after 1 s idle
        assert {c.code() for c in stalled.calls} == {grpc.StatusCode.CANCELLED}
        open_session(s.stub, 0, 6, "a")
        assert tuple(prefill(s.stub, "a", torch.tensor([[5, 17]])).data.shape) == (1, 1, 512)
        assert eventually(lambda: s.servicer.gate.in_progress() == 0)
    finally:
        stalled.release()
        s.close()


def test_unary_body_that_never_arrives_is_cut_off(tiny_models):
    s = Server(tiny_models["llama"], token=TOKEN, body_timeout_s=0.5)
    stalled = Stalled()
    try:
        stalled.open(s.channel, "LoadStage", metadata=AUTH)
        assert stalled.wait_ended(5) == 1 and stalled.calls[0].code() == grpc.StatusCode.CANCELLED
        assert eventually(lambda: s.servicer.gate.in_progress() == 0)
    finally:
        stalled.release()
        s.close()


# -- worker processes ------------------------------------------------------------------------------
class WorkerProcess:
    def __init__(self, model: Path, *args: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", NOODLE_TOKEN=TOKEN)
        cmd = [sys.executable, "-m", "noodle.cli.main", "worker", "--model", str(model), "--port", "0", "--threads", "1", *args]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            m = _LINE.search(self.text())
            if m:
                self.address = f"{m.group(1)}:{m.group(2)}"
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"worker did not start:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        self.ps = psutil.Process(self.proc.pid)

    def text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.log.close()


def test_big_bodies_do_not_grow_the_worker(tiny_models):
    w = WorkerProcess(tiny_models["llama"])
    big = 64 * 2**20
    channel = grpc.insecure_channel(w.address, options=[("grpc.max_send_message_length", 2 * big)])
    stub = pb_grpc.StageServiceStub(channel)
    try:
        stub.Health(pb.HealthRequest(), timeout=10, metadata=AUTH)
        open_session(stub, 0, 2, "a")
        prefill(stub, "a", torch.tensor([[5, 17, 99]]))
        before = w.rss_mb()
        req = pb.ForwardRequest(session="a", prefill=True, data=pb.Tensor(dtype="int64", shape=[1, big // 8], data=bytes(big)))
        codes = []
        for metadata in ((), (("authorization", "Bearer wrong"),), (), AUTH):  # 4 x 64 MiB, the last with the token
            with pytest.raises(grpc.RpcError) as err:
                stub.Forward(req, timeout=60, metadata=metadata)
            codes.append(err.value.code())
        del req
        after = w.rss_mb()
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert after - before < 32, f"worker grew from {before:.0f} to {after:.0f} MiB"
        assert stub.Health(pb.HealthRequest(), timeout=10, metadata=AUTH).sessions == 1
    finally:
        channel.close()
        w.kill()


def test_garbage_on_a_stream_then_sigterm_stops_the_worker(tiny_models):
    w = WorkerProcess(tiny_models["llama"])
    channel = grpc.insecure_channel(w.address)
    try:
        pb_grpc.StageServiceStub(channel).Health(pb.HealthRequest(), timeout=10, metadata=AUTH)
        go = threading.Event()

        def requests() -> Iterator[bytes]:
            yield b"\xff\xff\xff\xff garbage"
            go.wait(30)

        call = channel.stream_stream(SERVICE + "ForwardStream", request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)(requests(), metadata=AUTH, timeout=30)  # fmt: skip
        time.sleep(1.0)
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        w.proc.wait(timeout=10)
        assert time.monotonic() - t0 < 6 and "stopped" in w.text()
        go.set()
        call.cancel()
    finally:
        channel.close()
        w.kill()


def test_garbage_message_is_invalid_argument(tiny_models):
    s = Server(tiny_models["llama"], token=TOKEN)
    try:
        fwd = s.channel.unary_unary(SERVICE + "Forward", request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            fwd(b"\xff\xff\xff\xff garbage", timeout=10, metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "protobuf" in err.value.details()
        stream = s.channel.stream_stream(SERVICE + "ForwardStream", request_serializer=lambda b: b,
                                         response_deserializer=lambda b: b)  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            list(stream(iter([b"\xff\xff\xff\xff garbage"]), timeout=10, metadata=AUTH))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert s.stub.Health(pb.HealthRequest(), timeout=5, metadata=AUTH).status == "serving"
    finally:
        s.close()


# -- shapes and positions --------------------------------------------------------------------------
def refused(fn, *args, **kw) -> tuple[grpc.StatusCode, str, dict]:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kw)
    return err.value.code(), err.value.details(), dict(err.value.trailing_metadata() or ())


def test_bad_positions_and_batches_are_invalid_argument_without_traceback(tiny_models, caplog):
    s = Server(tiny_models["llama"])  # 256 positions
    bad = grpc.StatusCode.INVALID_ARGUMENT
    try:
        open_session(s.stub, 0, 6, "a", metadata=())
        code, msg, trailing = refused(prefill, s.stub, "a", torch.ones(1, 257, dtype=torch.long), metadata=())
        assert code == bad and "257" in msg and "256 positions" in msg and "\n" not in msg and not trailing
        prefill(s.stub, "a", torch.ones(1, 255, dtype=torch.long), metadata=())
        prefill(s.stub, "a", torch.ones(1, 1, dtype=torch.long), metadata=(), prefill_=False)  # position 255: the last
        code, msg, trailing = refused(prefill, s.stub, "a", torch.ones(1, 1, dtype=torch.long), metadata=(), prefill_=False)
        assert code == bad and "256" in msg and "\n" not in msg and not trailing
        prefill(s.stub, "a", torch.tensor([[5, 6, 7]]), metadata=())  # a new prefill starts over
        code, msg, trailing = refused(prefill, s.stub, "a", torch.ones(2, 1, dtype=torch.long), metadata=(), prefill_=False)
        assert code == bad and "batch 1" in msg and "got 2" in msg and not trailing
        code, msg, _ = refused(prefill, s.stub, "a", torch.ones(9, 2, dtype=torch.long), metadata=())
        assert code == bad and "--max-batch" in msg
        assert tuple(prefill(s.stub, "a", torch.ones(1, 1, dtype=torch.long), metadata=(), prefill_=False).data.shape) == (1, 1, 512)

        stage = next(iter(s.servicer.stages.values()))

        def boom(msg):
            raise RuntimeError("boom in block 2\nsecond line")

        stage.step = boom
        with caplog.at_level(logging.ERROR, logger="noodle.executors.grpc.worker"):
            code, msg, trailing = refused(prefill, s.stub, "a", torch.tensor([[5, 6]]), metadata=())
        assert code == grpc.StatusCode.INTERNAL and "RuntimeError: boom in block 2" in msg and "\n" not in msg
        assert "Traceback" not in msg and all("traceback" not in k for k in trailing)
        ref = trailing["noodle-error-id"]
        assert ref in msg and any(ref in r.getMessage() and r.exc_info for r in caplog.records)
    finally:
        s.close()
