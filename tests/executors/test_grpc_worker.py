"""The gRPC worker at its edge: who may call, what it refuses, and that it keeps serving.

These run the real server in this process on 127.0.0.1 (the multi-process runs
are in test_grpc_executor.py) and talk to it through the generated stub.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from noodle.cli.main import main
from noodle.errors import ExecutorError, SpecError
from noodle.executors.failover import RetryPolicy
from noodle.executors.grpc import stage_service_pb2 as pb
from noodle.executors.grpc.coordinator import GrpcExecutor
from noodle.executors.grpc.wire import from_proto, to_proto
from noodle.executors.grpc.server import serve
from noodle.executors.grpc.worker import ERROR_ID_KEY, WorkerConfig

from .conformance import PROMPT_SETS, plan_for, reference
from .inprocess import Server


@pytest.fixture
def server(tiny_models) -> Iterator[Server]:
    s = Server(tiny_models["llama"], max_tensor_bytes=64 * 1024, max_sessions=2)
    yield s
    s.close()


def code_of(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, timeout=30, **kw)
    return err.value.code(), err.value.details()


def forward(session: str, data: pb.Tensor, *, prefill: bool = True, mask: pb.Tensor | None = None) -> pb.ForwardRequest:
    req = pb.ForwardRequest(session=session, data=data, prefill=prefill)
    if mask is not None:
        req.attention_mask.CopyFrom(mask)
    return req


def open_session(s: Server, start: int, end: int, session: str) -> str:
    stage = s.stub.LoadStage(pb.LoadStageRequest(start=start, end=end), timeout=60).stage.stage_id
    s.stub.CreateSession(pb.CreateSessionRequest(stage_id=stage, session=session), timeout=10)
    return stage


def test_malformed_requests_are_refused_and_the_worker_keeps_serving(server):
    s = server
    bad = grpc.StatusCode.INVALID_ARGUMENT
    code, msg = code_of(s.stub.LoadStage, pb.LoadStageRequest(start=4, end=9))
    assert code == bad and "[4, 9)" in msg and "[0, 6)" in msg
    first = open_session(s, 0, 2, "a")
    assert code_of(s.stub.CreateSession, pb.CreateSessionRequest(stage_id="nope", session="x"))[0] == grpc.StatusCode.NOT_FOUND
    ids = to_proto(torch.tensor([[5, 17, 99]]))
    assert code_of(s.stub.Forward, forward("unknown", ids))[0] == grpc.StatusCode.NOT_FOUND
    code, msg = code_of(s.stub.Forward, forward("a", pb.Tensor(dtype="complex64", shape=[1, 3], data=b"\0" * 24)))
    assert code == bad and "data.dtype" in msg and "complex64" in msg
    code, msg = code_of(s.stub.Forward, forward("a", pb.Tensor(dtype="int64", shape=[1, 3], data=b"\0" * 20)))
    assert code == bad and "20 bytes" in msg and "needs 24 bytes" in msg
    code, msg = code_of(s.stub.Forward, forward("a", pb.Tensor(dtype="int64", shape=[1, 100000], data=b"")))
    assert code == bad and "over this worker's limit of 65536 bytes" in msg
    code, msg = code_of(s.stub.Forward, forward("a", to_proto(torch.tensor([[5, 999]]))))
    assert code == bad and "[0, 512)" in msg
    code, msg = code_of(s.stub.Forward, forward("a", ids, mask=to_proto(torch.tensor([[1, 2, 1]]))))
    assert code == bad and "0 or 1" in msg
    code, msg = code_of(s.stub.Forward, forward("a", ids, prefill=False))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "prefill" in msg
    open_session(s, 2, 6, "b")
    code, msg = code_of(s.stub.Forward, forward("b", to_proto(torch.zeros(1, 3, 32))))
    assert code == bad and "(batch, tokens, 64)" in msg
    code, msg = code_of(s.stub.Forward, forward("b", to_proto(torch.zeros(1, 3, 64, dtype=torch.float64))))
    assert code == bad and "float32" in msg
    # still serving: a well-formed step works and the health check answers
    reply = s.stub.Forward(forward("a", ids), timeout=30)
    assert tuple(reply.data.shape) == (1, 3, 64) and reply.t_out_ns > reply.t_in_ns
    health = s.stub.Health(pb.HealthRequest(), timeout=5)
    assert health.status == "serving" and health.sessions == 2 and first in [st.stage_id for st in health.stages]


def test_oversized_message_is_refused_by_grpc(tiny_models):
    s = Server(tiny_models["llama"], max_message_bytes=32 * 1024, max_tensor_bytes=32 * 1024)
    try:
        open_session(s, 0, 2, "a")
        big = to_proto(torch.zeros(1, 10000, dtype=torch.int64))  # 80 KB
        assert code_of(s.stub.Forward, forward("a", big))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert s.stub.Health(pb.HealthRequest(), timeout=5).status == "serving"
    finally:
        s.close()


def test_sessions_are_capped_and_idle_ones_reaped(tiny_models):
    s = Server(tiny_models["llama"], max_sessions=2, idle_timeout_s=0.3)
    try:
        stage = open_session(s, 0, 6, "one")
        s.stub.CreateSession(pb.CreateSessionRequest(stage_id=stage, session="two"), timeout=5)
        code, msg = code_of(s.stub.CreateSession, pb.CreateSessionRequest(stage_id=stage, session="three"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 sessions" in msg
        code, _ = code_of(s.stub.CreateSession, pb.CreateSessionRequest(stage_id=stage, session="two"))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        time.sleep(0.8)  # the reaper runs every idle_timeout / 4
        assert s.stub.Health(pb.HealthRequest(), timeout=5).sessions == 0
        assert code_of(s.stub.Forward, forward("one", to_proto(torch.tensor([[1, 2]]))))[0] == grpc.StatusCode.NOT_FOUND
        s.stub.CreateSession(pb.CreateSessionRequest(stage_id=stage, session="three"), timeout=5)
    finally:
        s.close()


def test_stages_beyond_the_limit_evict_idle_ones(tiny_models):
    s = Server(tiny_models["llama"], max_stages=1)
    try:
        open_session(s, 0, 3, "busy")
        code, msg = code_of(s.stub.LoadStage, pb.LoadStageRequest(start=3, end=6))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-stages" in msg
        s.stub.CloseSession(pb.CloseSessionRequest(session="busy"), timeout=5)
        s.stub.LoadStage(pb.LoadStageRequest(start=3, end=6), timeout=60)
        assert [(st.start, st.end) for st in s.stub.Health(pb.HealthRequest(), timeout=5).stages] == [(3, 6)]
    finally:
        s.close()


def test_remote_exception_comes_back_as_one_line_and_its_traceback_stays_on_the_worker(tiny_models, caplog):
    model = tiny_models["llama"]
    s = Server(model)
    try:
        plan = plan_for(model, [0, 3, 6])
        with GrpcExecutor(plan, model, workers={"node0": s.address, "node1": s.address}) as ex:
            stage = next(st for st in s.servicer.stages.values() if st.start == 3)

            def boom(msg):
                raise RuntimeError("boom in block 2")

            stage.step = boom
            with pytest.raises(ExecutorError, match="node1.*INTERNAL.*RuntimeError: boom in block 2") as err:
                ex.generate(PROMPT_SETS["batch1"], max_new_tokens=3)
        assert err.value.remote_traceback is None and "Traceback" not in str(err.value)
        ref = str(err.value).split("worker error ")[1].split(",")[0]
        logged = [r for r in caplog.records if ref in r.getMessage()]
        assert logged and logged[0].exc_info and "boom in block 2" in str(logged[0].exc_info[1])
    finally:
        s.close()
    assert not ERROR_ID_KEY.endswith("-bin")


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    crypto = pytest.importorskip("cryptography")
    del crypto
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "noodle-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_file, key_file


def test_tls_with_token(tiny_models, tmp_path):
    model = tiny_models["gpt2"]
    cert, key = _self_signed(tmp_path)
    server, servicer, port = serve(WorkerConfig(model_dir=model, port=0, token="s3cret", tls_cert=cert, tls_key=key))
    try:
        addr = {"node0": f"127.0.0.1:{port}", "node1": f"127.0.0.1:{port}"}
        plan = plan_for(model, [0, 3, 6])
        with GrpcExecutor(plan, model, workers=addr, token="s3cret", tls_ca=cert) as ex:
            tokens = ex.generate(PROMPT_SETS["batch1"], max_new_tokens=4).tokens
        assert tokens == reference(model, PROMPT_SETS["batch1"], 4)[0]
        with pytest.raises(ExecutorError, match="refused"):
            with GrpcExecutor(plan, model, workers=addr, token="wrong", tls_ca=cert):
                pass
        with pytest.raises(ExecutorError, match="no worker answers"):  # plaintext client, TLS port
            with GrpcExecutor(plan, model, workers=addr, token="s3cret", policy=RetryPolicy(health_timeout_s=2.0, connect_s=1.0)):
                pass
    finally:
        server.stop(0)
        servicer.close()


def test_worker_settings_are_checked(tiny_models, capsys):
    model = tiny_models["llama"]
    with pytest.raises(SpecError, match="reachable from other machines and no --token"):
        WorkerConfig(model_dir=model, host="0.0.0.0").check()
    WorkerConfig(model_dir=model, host="0.0.0.0", insecure=True).check()
    with pytest.raises(SpecError, match="give both"):
        WorkerConfig(model_dir=model, tls_cert=Path("c.pem")).check()
    assert main(["worker", "--model", str(model), "--host", "0.0.0.0"]) == 2
    assert main(["worker", "--model", str(model), "--backend", "mpi"]) == 2
    err = capsys.readouterr().err
    assert "noodle: error: --host: 0.0.0.0" in err and "Traceback" not in err


def test_wire_roundtrip_keeps_dtype_and_shape():
    for t in (torch.randn(2, 3, 8), torch.randn(1, 1, 4).to(torch.bfloat16), torch.tensor([[1, 2]]), torch.zeros(0, 4)):
        back = from_proto(to_proto(t), field="t")
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)


def test_committed_stubs_match_the_proto(tmp_path):
    """The generated modules in the package are what protos/stage_service.proto generates today."""
    pytest.importorskip("grpc_tools")
    root = Path(__file__).resolve().parents[2]
    # protoc runs in its own process: grpc_tools' native module loaded beside torch and the
    # grpc runtime has crashed a whole pytest run once; a subprocess keeps that contained.
    args = [sys.executable, "-m", "grpc_tools.protoc", f"-Inoodle/executors/grpc={root / 'protos'}",
            f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(root / "protos" / "stage_service.proto")]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("stage_service_pb2.py", "stage_service_pb2_grpc.py"):
        fresh = (tmp_path / "noodle" / "executors" / "grpc" / name).read_text()
        assert fresh == (root / "noodle" / "executors" / "grpc" / name).read_text(), f"{name}: regenerate the stubs"
