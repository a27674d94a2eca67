"""Continuous batching over gRPC workers: packed steps on the wire, the worker's edge, failover with sequences in flight."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

import grpc
import pytest
import torch

from noodle.errors import SpecError
from noodle.executors.batching import BatchingPipeline, make_pipeline
from noodle.executors.failover import RetryPolicy
from noodle.executors.grpc import stage_service_pb2 as pb
from noodle.executors.grpc.coordinator import GrpcExecutor
from noodle.executors.grpc.edge import PackedLimits, seq_key
from noodle.executors.grpc.wire import from_proto, to_proto
from noodle.executors.messages import SeqChunk, StageInput
from noodle.executors.scheduler import Pipeline
from noodle.executors.stage import StageRunner

from .conformance import alone, plan_for, random_requests
from .inprocess import Server
from .procs import WorkerPool, children

TOKEN = "batch-token-5c1e"
FAST = RetryPolicy(step_timeout_s=3.0, health_timeout_s=0.5, attempts=2, backoff_s=0.05)
BAD, STATE, GONE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND


def packed(session: str, data: torch.Tensor | pb.Tensor, *chunks: tuple, exact: bool = False) -> pb.ForwardRequest:
    """A packed request; each chunk is ``(seq, tokens[, start[, logits]])``."""
    req = pb.ForwardRequest(session=session, exact=exact)
    req.data.CopyFrom(data if isinstance(data, pb.Tensor) else to_proto(data))
    for c in chunks:
        req.seqs.add(seq=c[0], tokens=c[1], start=c[2] if len(c) > 2 else False, logits=c[3] if len(c) > 3 else False)
    return req


def refused(stub_call, req) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        stub_call(req, timeout=30)
    return err.value.code(), err.value.details()


def session_on(s: Server, start: int, end: int, session: str) -> str:
    stage = s.stub.LoadStage(pb.LoadStageRequest(start=start, end=end), timeout=60).stage.stage_id
    s.stub.CreateSession(pb.CreateSessionRequest(stage_id=stage, session=session), timeout=10)
    return stage


# -- the worker's edge ------------------------------------------------------------------------------


def test_a_packed_step_over_the_wire_equals_the_stage_in_process(tiny_models):
    model = tiny_models["llama"]
    s = Server(model)
    try:
        session_on(s, 0, 6, "p")
        local = StageRunner(model, 0, 6)
        chunks = (SeqChunk("a", 3, start=True, logits=True), SeqChunk("b", 2, start=True, logits=True))
        ids = torch.tensor([[5, 17, 99, 42, 7]])
        for exact in (False, True):
            reply = s.stub.Forward(packed("p", ids, ("a", 3, True, True), ("b", 2, True, True), exact=exact), timeout=30)
            want = local.step(StageInput("x", ids, seqs=chunks, exact=exact)).data
            got = from_proto(reply.data, field="reply")
            assert reply.is_logits and tuple(got.shape) == (2, 1, 512)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert reply.kv_cache_bytes > 0
            freed = s.stub.CloseSession(pb.CloseSessionRequest(session="p", seqs=["a", "b"]), timeout=10)
            assert freed.kv_cache_bytes == reply.kv_cache_bytes  # the estimate is exact for full attention
            for seq in ("a", "b"):
                local.end_session(seq)
        stage = next(iter(s.servicer.stages.values()))
        assert stage.sessions() == [] and s.servicer.sessions["p"].seqs == {}
        health = s.stub.Health(pb.HealthRequest(), timeout=5)
        assert health.sessions == 1 and health.max_seqs == 64 and health.max_step_tokens > 256
    finally:
        s.close()


def test_packed_fuzz_is_refused_with_the_numbers_and_the_worker_keeps_serving(tiny_models):
    s = Server(tiny_models["llama"], max_seqs=4, max_step_tokens=300)
    try:
        session_on(s, 0, 2, "p")
        middle = session_on(s, 2, 6, "h")
        s.stub.CreateSession(pb.CreateSessionRequest(stage_id=middle, session="batch"), timeout=10)
        ok = s.stub.Forward(packed("p", torch.tensor([[5, 17, 99, 4, 8]]), ("a", 3, True), ("b", 2, True)), timeout=30)
        assert tuple(ok.data.shape) == (1, 5, 64)
        ids = torch.tensor([[5, 17, 99]])
        cases = [
            (packed("p", ids, ("c", 2, True)), BAD, ["bring 2 tokens", "data holds 3"]),
            (packed("p", ids, ("c", 4, True)), BAD, ["bring 4 tokens", "data holds 3"]),
            (packed("p", torch.tensor([[5, 17, 99], [1, 2, 3]]), ("c", 3, True)), BAD, ["batch 1", "[2, 3]"]),
            (packed("p", torch.tensor([5, 17, 99]), ("c", 3, True)), BAD, ["(batch, tokens)", "[3]"]),
            (packed("p", ids, ("c", 0, True), ("d", 3, True)), BAD, ["seqs[0].tokens", "brings 0 tokens"]),
            (packed("p", ids, ("c", -2, True), ("d", 5, True)), BAD, ["seqs[0].tokens", "-2"]),
            (packed("p", ids, ("c", 1, True), ("c", 2, True)), BAD, ["seqs[1].seq", "appears twice"]),
            (packed("p", ids, ("", 3, True)), BAD, ["seqs[0].seq", "1 to 128 printable"]),
            (packed("p", ids, ("x\x00y", 3, True)), BAD, ["seqs[0].seq", "printable"]),
            (packed("p", ids, ("z" * 129, 3, True)), BAD, ["seqs[0].seq", "129 characters"]),
            (packed("p", torch.tensor([[1] * 5]), *[(f"n{i}", 1, True) for i in range(5)]), BAD,
             ["5 sequences in one step", "limit of 4 (--max-seqs)"]),
            (packed("p", torch.tensor([[1] * 301]), ("c", 301, True)), BAD, ["301 tokens", "limit of 300 (--max-step-tokens)"]),
            (packed("p", torch.tensor([[5, 999, 3]]), ("c", 3, True)), BAD, ["[0, 512)"]),
            (packed("p", ids, ("zz", 3)), STATE, ["unknown sequence 'zz'", "must say start"]),
            (packed("p", ids, ("a", 3, True)), STATE, ["'a'", "live already (3 positions)"]),
            (packed("p", torch.tensor([[1, 2, 3, 4]]), ("a", 1), ("c", 1, True), ("d", 1, True), ("e", 1, True)), STATE,
             ["would hold 5 live sequences (2 now)", "limit of 4"]),
            (packed("p", torch.tensor([[1] * 254]), ("a", 254)), BAD, ["'a'", "254 more token(s) after 3", "256 positions"]),
            (packed("p", torch.tensor([[1] * 257]), ("c", 257, True)), BAD, ["257 more token(s) after 0", "256 positions"]),
            (packed("h", torch.zeros(1, 3, 64), ("a", 3)), STATE, ["unknown sequence 'a' in session 'h'"]),  # another stage's session
            (packed("h", torch.zeros(1, 3, 32), ("a", 3, True)), BAD, ["(batch, tokens, 64)", "[1, 3, 32]"]),
            (packed("h", torch.zeros(1, 3, 64, dtype=torch.float64), ("a", 3, True)), BAD, ["float32", "float64"]),
            (packed("nope", ids, ("a", 3)), GONE, ["unknown session 'nope'"]),
        ]
        prefill = packed("p", ids, ("c", 3, True))
        prefill.prefill = True
        masked = packed("p", ids, ("c", 3, True))
        masked.attention_mask.CopyFrom(to_proto(torch.ones(1, 3, dtype=torch.long)))
        cases += [(prefill, BAD, ["prefill: unused in a packed step"]), (masked, BAD, ["attention_mask", "no padding"])]
        s.stub.Forward(pb.ForwardRequest(session="batch", data=to_proto(torch.zeros(1, 2, 64)), prefill=True), timeout=30)
        cases += [(packed("batch", torch.zeros(1, 2, 64), ("a", 2, True)), STATE, ["runs batch steps"]),
                  (pb.ForwardRequest(session="p", data=to_proto(ids), prefill=True), STATE, ["runs packed steps"])]  # fmt: skip
        for req, code, words in cases:
            for call in (s.stub.Forward, lambda r, timeout: next(s.stub.ForwardStream(iter([r]), timeout=timeout))):
                got, msg = refused(call, req)
                assert got == code and all(w in msg for w in words), (req.seqs[:2], got, msg)
        # nothing refused changed the session: 'a' and 'b' continue where they were, a new 'c' starts
        assert s.servicer.sessions["p"].seqs == {"a": 3, "b": 2}
        more = s.stub.Forward(packed("p", torch.tensor([[7, 8, 9, 10]]), ("b", 1), ("a", 1), ("c", 2, True)), timeout=30)
        assert tuple(more.data.shape) == (1, 4, 64) and s.servicer.sessions["p"].seqs == {"a": 4, "b": 3, "c": 2}
        assert s.stub.Health(pb.HealthRequest(), timeout=5).status == "serving"
    finally:
        s.close()


def test_one_sequence_is_freed_alone_and_a_reaped_session_frees_them_all(tiny_models):
    s = Server(tiny_models["gpt2"])
    try:
        session_on(s, 0, 3, "p")
        stage = next(iter(s.servicer.stages.values()))
        s.stub.Forward(packed("p", torch.tensor([[5, 6, 7, 8]]), ("a", 1, True), ("b", 3, True)), timeout=30)
        assert sorted(stage.sessions()) == [seq_key("p", "a"), seq_key("p", "b")]
        code, msg = refused(s.stub.CloseSession, pb.CloseSessionRequest(session="p", seqs=["a", "ghost"]))
        assert code == GONE and "1 of 2 sequences are not live" in msg and "'ghost'" in msg and "nothing freed" in msg
        kv = s.stub.CloseSession(pb.CloseSessionRequest(session="p", seqs=["b"]), timeout=10).kv_cache_bytes
        assert kv == 64 * 2 * 2 * 64 * 4  # one 64-token KV block (3 positions used) x 2 layers x (K, V) x 64 wide x float32
        assert stage.sessions() == [seq_key("p", "a")] and s.stub.Health(pb.HealthRequest(), timeout=5).sessions == 1
        code, msg = refused(s.stub.Forward, packed("p", torch.tensor([[9]]), ("b", 1)))
        assert code == STATE and "unknown sequence 'b'" in msg
        assert s.servicer.reap(now=float("inf")) == ["p"]
        assert stage.sessions() == [] and s.servicer.sessions == {}
    finally:
        s.close()


def test_a_worker_without_packed_steps_keeps_groups_and_refuses_continuous(tiny_models):
    model = tiny_models["llama"]
    s = Server(model)
    try:
        with GrpcExecutor(plan_for(model, [0, 3, 6]), model, workers={"node0": s.address, "node1": s.address}) as ex:
            assert isinstance(ex.pipeline(batching="auto"), BatchingPipeline)  # what `noodle serve --batching auto` asks
            assert ex.pipeline(batching="exact", concurrency=100).concurrency == 64  # the workers' --max-seqs
            s.servicer.packed = PackedLimits(0, 0, 256)  # what an older worker's health says: no max_seqs
            pipe = ex.pipeline(batching="auto")
            assert type(pipe) is Pipeline
            with pytest.raises(SpecError, match=r"--batching continuous: this backend's stages \(node0, node1\) do not take packed"):
                ex.pipeline(batching="continuous")
    finally:
        s.close()


def test_serve_with_auto_batching_over_grpc_runs_continuous(tiny_models):
    """``noodle serve --backend grpc --batching auto``: the server's pipeline batches every running sequence."""
    from noodle.cli.network import backend_options
    from noodle.serve.build import build_server

    model = tiny_models["gpt2"]
    s = Server(model)
    try:
        options = backend_options("grpc", workers=f"node0={s.address},node1={s.address}", spare=None, token=None,
                                  tls_ca=None, step_timeout=None)  # fmt: skip
        served = build_server(model, plan_for(model, [0, 4, 6]), None, backend="grpc", backend_options=options,
                              concurrency=4, batching="auto")  # fmt: skip
        runtime = served.runtime
        runtime.load()
        try:
            assert runtime.state == "ready", runtime.error
            assert isinstance(runtime.pipeline, BatchingPipeline) and runtime.pipeline.batching == "continuous"
            prompts = [[5, 17, 99], [7, 8], [300, 1, 2, 3]]
            got = [h.result(timeout=60).tokens for h in [runtime.pipeline.submit(p, max_new_tokens=5) for p in prompts]]
        finally:
            runtime.close()
        assert got == [alone(model, p, 5) for p in prompts]
        assert s.stub.Health(pb.HealthRequest(), timeout=5).sessions == 0  # the lanes closed their packed sessions
    finally:
        s.close()


# -- replay ---------------------------------------------------------------------------------------------


def _staggered_steps(rounds: int) -> list[StageInput]:
    """Packed steps of a middle stage's inputs: sequences start at different steps, prompts read in chunks."""
    gen = torch.Generator().manual_seed(7)
    plan = {"a": [5, 1, 1, 1, 1, 1], "b": [2, 2, 3, 1, 1], "c": [7, 1, 1, 1], "d": [1, 1]}
    steps = []
    for r in range(rounds):
        chunks = [SeqChunk(q, n[r - i], start=r == i) for i, (q, n) in enumerate(plan.items()) if 0 <= r - i < len(n)]
        data = torch.randn(1, sum(c.tokens for c in chunks), 64, generator=gen)
        steps.append(StageInput(f"b{r}", data, seqs=tuple(chunks)))
    return steps


@pytest.mark.parametrize("exact", [True, False])
def test_a_replayed_stage_continues_as_the_lost_one(tiny_models, exact):
    """The log's replay rebuilds each sequence's KV: the next step is bitwise the lost stage's in exact mode,
    equal up to float reassociation in continuous mode."""
    from dataclasses import replace as copy_with

    from noodle.executors.grpc.seqlog import SeqLog

    model = tiny_models["llama"]
    lost, rebuilt = StageRunner(model, 2, 5), StageRunner(model, 2, 5)
    log = SeqLog()
    steps = [copy_with(m, exact=exact) for m in _staggered_steps(6)]
    for m in steps[:-1]:
        lost.step(m)
        log.record(m)
    assert len(log) == 4 and log.chunks() == sum(len(m.seqs) for m in steps[:-1])
    replay = list(log.replay(max_seqs=3, max_step_tokens=6))
    assert all(len(m.seqs) <= 3 and m.new_tokens <= 6 or len(m.seqs) == 1 for m in replay)
    assert all(not c.logits for m in replay for c in m.seqs) and all(m.exact == exact for m in replay)
    for m in replay:
        rebuilt.step(m)
    want, got = lost.step(steps[-1]).data, rebuilt.step(steps[-1]).data
    if exact:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for q in "abcd":
        assert lost.cache_bytes(q) == rebuilt.cache_bytes(q)
        assert log.end(q)
    assert not log.end("a") and list(log.replay(1, 1)) == []


# -- pipelines over worker processes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pools(tiny_models, spawner) -> Iterator[dict[str, WorkerPool]]:
    before = {p.pid for p in children()}
    out: dict[str, WorkerPool] = {}
    try:
        out["llama"] = WorkerPool(tiny_models["llama"], 4, cli=0, token=TOKEN)
        out["gpt2"] = WorkerPool(tiny_models["gpt2"], 3, cli=0, token=TOKEN)
        yield out
    finally:
        for p in out.values():
            p.close()
    assert not [c for c in children() if c.pid not in before], "worker processes left behind"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["continuous", "exact"])
def test_sixteen_requests_batched_over_three_workers_equal_generate_alone(tiny_models, pools, family, mode):
    model = tiny_models[family]
    addrs = {f"node{i}": w.address for i, w in enumerate(pools[family].workers[:3])}
    work = random_requests(16, seed=21, prompt=(1, 24), new=(1, 12))
    with GrpcExecutor(plan_for(model, [0, 2, 4, 6]), model, workers=addrs, token=TOKEN) as ex:
        with ex.pipeline(concurrency=8, prefill_chunk=5, batching=mode, max_batch_tokens=16) as pipe:
            assert isinstance(pipe, BatchingPipeline) and pipe.batching == mode
            comps = [h.result(timeout=120) for h in [pipe.submit(p, max_new_tokens=n) for p, n in work]]
            stats = pipe.stats()
        lanes = list(ex._lanes)  # the pipeline has closed: every end marker has walked the lanes
        open_sessions = [lane.client.health(2.0).sessions for lane in lanes]
        live = [len(lane._seqs) for lane in lanes]
    for (p, n), c in zip(work, comps):
        assert c.tokens == alone(model, p, n), f"prompt of {len(p)} tokens"
    assert open_sessions == [0, 0, 0], "the last sequence's end closed each lane's session on its worker"
    assert live == [0, 0, 0], "every finished sequence was ended on every stage"
    tokens = sum(len(c.tokens) for c in comps)
    assert stats.peak_in_flight == 8 and all(st.steps == lanes[0]._steps for st in stats.stages)
    assert lanes[0]._steps < tokens, "a step carries several sequences (one message per step and stage)"


def test_kv_pressure_preempts_on_the_workers_and_recomputes(tiny_models, pools):
    model = tiny_models["llama"]
    addrs = {f"node{i}": w.address for i, w in enumerate(pools["llama"].workers[:3])}
    work = random_requests(6, seed=9, prompt=(8, 24), new=(30, 45))
    with GrpcExecutor(plan_for(model, [0, 2, 4, 6]), model, workers=addrs, token=TOKEN) as ex:
        base = ex.pipeline(concurrency=6, batching="continuous")
        pipe = make_pipeline(base.lanes, batching="continuous", concurrency=6, max_batch_tokens=24,
                             eos_token_id=base._eos, pad_token_id=base.pad_token_id, kv_capacity_tokens=[110])  # fmt: skip
        with pipe:
            comps = [h.result(timeout=120) for h in [pipe.submit(p, max_new_tokens=n) for p, n in work]]
            stats = pipe.stats()
        live = [len(lane._seqs) for lane in ex._lanes]
    assert stats.preemptions > 0 and stats.kv_reserved_tokens == 0
    for (p, n), c in zip(work, comps):
        assert c.tokens == alone(model, p, n), f"prompt of {len(p)} tokens"
    assert live == [0, 0, 0], "preempted and finished sequences were ended on every stage"


def _kill_after_tokens(n: int, worker) -> tuple[threading.Event, object]:
    count = [0]
    lock = threading.Lock()
    fired = threading.Event()

    def on_token(_: int) -> None:
        with lock:
            count[0] += 1
            if count[0] == n and not fired.is_set():
                fired.set()
                worker.kill()

    return fired, on_token


def test_a_killed_worker_moves_to_a_spare_and_every_sequence_is_replayed_exactly(tiny_models, pools):
    model = tiny_models["llama"]
    a, b, _, d = pools["llama"].workers
    work = random_requests(12, seed=33, prompt=(4, 24), new=(6, 14))
    fired, on_token = _kill_after_tokens(20, b)
    notes: list[str] = []
    with GrpcExecutor(plan_for(model, [0, 3, 6]), model, workers={"node0": a.address, "node1": b.address},
                      spares=[d.address], token=TOKEN, policy=FAST, log=notes.append) as ex:  # fmt: skip
        with ex.pipeline(concurrency=6, prefill_chunk=6, batching="exact", max_batch_tokens=24) as pipe:
            comps = [h.result(timeout=120) for h in [pipe.submit(p, max_new_tokens=n, on_token=on_token) for p, n in work]]
            assert [e.action for e in pipe.stats().failovers] == ["spare"]  # what noodle serve shows
        events = list(ex.failovers)
    assert fired.is_set() and not b.alive
    assert [c.finish_reason for c in comps].count("error") == 0
    for (p, n), c in zip(work, comps):
        assert c.tokens == alone(model, p, n)
    (ev,) = events
    assert ev.action == "spare" and ev.node == "node1" and d.address in ev.detail and ev.replayed_steps >= 1
    assert any(re.search(r"0 group\(s\) and [1-9]\d* sequence\(s\) in flight replayed", line) for line in notes), notes


def test_without_a_spare_continuous_sequences_move_to_a_neighbours_worker(tiny_models, pools):
    model = tiny_models["gpt2"]
    a, b, c = pools["gpt2"].workers
    work = random_requests(10, seed=41, prompt=(4, 20), new=(6, 12))
    fired, on_token = _kill_after_tokens(15, b)
    addrs = {"node0": a.address, "node1": b.address, "node2": c.address}
    with GrpcExecutor(plan_for(model, [0, 2, 4, 6]), model, workers=addrs, token=TOKEN, policy=FAST,
                      log=lambda _: None) as ex:  # fmt: skip
        with ex.pipeline(concurrency=5, batching="continuous", max_batch_tokens=16) as pipe:
            comps = [h.result(timeout=120) for h in [pipe.submit(p, max_new_tokens=n, on_token=on_token) for p, n in work]]
        events = list(ex.failovers)
    assert fired.is_set() and not b.alive
    assert [comp.finish_reason for comp in comps].count("error") == 0
    for (p, n), comp in zip(work, comps):
        assert comp.tokens == alone(model, p, n)  # the replayed KV differs from the lost one by float reassociation only
    (ev,) = events
    assert ev.action == "merged" and ev.node == "node1" and ev.replayed_steps >= 1
