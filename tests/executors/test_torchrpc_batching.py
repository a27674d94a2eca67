"""Continuous and exact batching over the torchrpc ring: packed steps cross real worker processes.

One 3-stage ring per family is shared by the tests that leave it whole; the tests that kill
a rank start their own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from noodle.errors import ExecutorError
from noodle.executors.batching import BatchingPipeline, make_pipeline
from noodle.executors.failover import RetryPolicy
from noodle.executors.ring.coordinator import TorchRpcExecutor
from noodle.executors.ring.wire import Flag, Op, WireChunk

from .conformance import alone, plan_for, random_requests
from .procs import children

POLICY = RetryPolicy(step_timeout_s=20.0, health_timeout_s=1.0)
CUTS = [0, 2, 4, 6]


def _ring(model, **kw) -> TorchRpcExecutor:
    return TorchRpcExecutor(plan_for(model, CUTS), model, threads=1, policy=POLICY, log=lambda _: None, **kw)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def ring(request, tiny_models, spawner) -> Iterator[tuple[str, TorchRpcExecutor]]:
    before = {p.pid for p in children()}
    with _ring(tiny_models[request.param]) as ex:
        yield request.param, ex
    assert not [c for c in children() if c.pid not in before], "ring workers left behind"


def _kv_held(ex: TorchRpcExecutor) -> list[int]:
    """Bytes of KV cache each stage holds now (a PING round the ring)."""
    back = ex._roundtrip(ex._live_ring().header(Op.PING), POLICY.step_timeout_s)
    return [back.step_slot(k).kv_bytes for k in range(len(ex.plan.stages))]


@pytest.mark.parametrize("mode", ["continuous", "exact"])
def test_sixteen_requests_packed_round_the_ring_equal_generate_alone(tiny_models, ring, mode):
    family, ex = ring
    model = tiny_models[family]
    work = random_requests(16, seed=31, prompt=(1, 24), new=(1, 12))
    pipe = ex.pipeline(concurrency=8, prefill_chunk=5, batching=mode, max_batch_tokens=16)
    assert isinstance(pipe, BatchingPipeline) and pipe.batching == mode and len(pipe._slots) == 3  # one per stage
    sent, run = [], pipe.lanes[0].run
    pipe.lanes[0].run = lambda msg: (sent.append(msg.seqs), run(msg))[1]  # type: ignore[method-assign]
    with pipe:
        done = [h.result(timeout=180) for h in [pipe.submit(p, max_new_tokens=n) for p, n in work]]
        stats = pipe.stats()
    for (prompt, new), comp in zip(work, done):
        assert comp.finish_reason in ("stop", "length"), comp.error
        assert comp.tokens == alone(model, prompt, new), f"{family} {mode}: prompt of {len(prompt)} tokens"
    assert stats.peak_in_flight == 8 and stats.kv_reserved_tokens == 0
    assert max(len(s) for s in sent) == 3, "a batch of 3 sequences (8 over 3 slots) crossed the ring as one message"
    assert all(sum(c.tokens for c in s) <= max(16, len(s)) for s in sent), "every step kept to the token budget"
    assert any(c.start and c.tokens == 5 for s in sent for c in s), "prompts were read in chunks"
    driver = pipe.lanes[0].driver
    assert not driver._ids and not driver._fed and not driver._outstanding, "every sequence's wire id was released"
    assert _kv_held(ex) == [0, 0, 0], "every sequence's KV cache was freed on every stage"


def test_kv_pressure_preempts_round_the_ring_and_recomputes(tiny_models, ring):
    """A tiny KV budget: sequences are preempted (their KV freed on every rank) and read again, tokens unchanged."""
    family, ex = ring
    model = tiny_models[family]
    work = random_requests(6, seed=5, prompt=(8, 24), new=(30, 45))
    base = ex.pipeline(concurrency=6, batching="continuous")
    pipe = make_pipeline(base.lanes, batching="continuous", concurrency=6, max_batch_tokens=24,
                         eos_token_id=base._eos, pad_token_id=base.pad_token_id, kv_capacity_tokens=[110])  # fmt: skip
    with pipe:
        done = [h.result(timeout=180) for h in [pipe.submit(p, max_new_tokens=n) for p, n in work]]
        stats = pipe.stats()
    assert stats.preemptions > 0 and stats.kv_reserved_tokens == 0
    for (prompt, new), comp in zip(work, done):
        assert comp.tokens == alone(model, prompt, new), f"{family}: prompt of {len(prompt)} tokens"
    assert _kv_held(ex) == [0, 0, 0], "preempted and finished sequences hold no KV on any rank"


def _refused(ex: TorchRpcExecutor, data: torch.Tensor, chunks: tuple[WireChunk, ...], flags: Flag = Flag.NONE) -> str:
    """Send a hand-made packed step round the ring; the error it comes back as."""
    ring = ex._live_ring()
    ring.send_data(ring.header(Op.STEP, flags=flags), data, None, 1, chunks)
    back, _ = ring.recv(ex.world - 1, POLICY.step_timeout_s)
    assert back.op == Op.ERROR
    err = ex._remote_error(back)
    assert isinstance(err, ExecutorError)
    return str(err)


def test_malformed_packed_steps_are_refused_by_the_workers_and_the_ring_stays_in_step(tiny_models, ring):
    family, ex = ring
    ids = torch.tensor([[5, 6]])
    text = _refused(ex, ids, (WireChunk(7, 3, start=True),))
    assert "rank 1" in text and "the chunks add up to 3 tokens, the packed tensor [1, 2] has 2" in text
    text = _refused(ex, ids, (WireChunk(7, 1, start=True), WireChunk(7, 1)))
    assert "chunks[1].seq: sequence 7 appears twice in one step" in text
    text = _refused(ex, ids, (WireChunk(7, 2, start=True),), Flag.TOP1)
    assert "rank 1 (stage 0): ring header.flags" in text and "PREFILL, ALL_LOGITS and TOP1 are for unpacked steps" in text
    text = _refused(ex, ids, (WireChunk(8, 2),))  # a continuation of a sequence the stages never saw
    assert "unknown sequence 's8'" in text
    big = torch.arange(3, 3 + 200).unsqueeze(0)  # too big to go inline: the table and the tokens go as the payload
    text = _refused(ex, big, (WireChunk(9, 150, start=True), WireChunk(10, 49, start=True)))
    assert "the chunks add up to 199 tokens, the packed tensor [1, 200] has 200" in text
    assert _kv_held(ex) == [0, 0, 0]
    prompt = [5, 17, 99, 42, 7]
    with ex.pipeline(concurrency=2, batching="continuous") as pipe:
        assert pipe.submit(prompt, max_new_tokens=4).result(timeout=60).tokens == alone(tiny_models[family], prompt, 4)


def test_a_failing_packed_step_and_a_cancel_free_their_sequences_and_the_ring_goes_on(tiny_models, ring):
    family, ex = ring
    model = tiny_models[family]
    with ex.pipeline(concurrency=3, batching="auto") as pipe:  # what `noodle serve --backend torchrpc` asks for
        assert isinstance(pipe, BatchingPipeline) and pipe.batching == "continuous"
        bad = pipe.submit([9, 600, 9], max_new_tokens=5).result(timeout=60)  # 600 is outside the 512-token vocabulary
        assert bad.finish_reason == "error" and "stage on node0 (rank 1) failed" in (bad.error or "")
        assert "IndexError" in (bad.error or "")
        long = pipe.submit([5, 6, 7], max_new_tokens=200)
        while not pipe._by_rid[long.id].tokens:
            time.sleep(0.005)
        long.cancel()
        comp = long.result(timeout=60)
        assert comp.finish_reason == "cancelled" and 0 < len(comp.tokens) < 200
        assert pipe.submit([4, 4], max_new_tokens=4).result(timeout=60).tokens == alone(model, [4, 4], 4)
    assert _kv_held(ex) == [0, 0, 0]


@pytest.mark.parametrize("mode", ["exact", "continuous"])
def test_a_killed_rank_is_respawned_and_every_packed_sequence_goes_on(tiny_models, spawner, mode):
    model = tiny_models["llama"]
    work = random_requests(10, seed=41, prompt=(2, 16), new=(4, 12))
    with _ring(model, restarts=1) as ex:
        victim = ex._procs[1]
        count, lock = [0], threading.Lock()

        def on_token(_: int) -> None:
            with lock:
                count[0] += 1
                if count[0] == 12:
                    victim.kill()

        with ex.pipeline(concurrency=5, prefill_chunk=3, batching=mode, max_batch_tokens=12) as pipe:
            comps = [h.result(timeout=180) for h in [pipe.submit(p, max_new_tokens=n, on_token=on_token) for p, n in work]]
        events = list(ex.failovers)
        held = _kv_held(ex)
    assert victim.returncode == -9
    assert [c.finish_reason for c in comps].count("error") == 0, [c.error for c in comps]
    for (p, n), c in zip(work, comps):
        assert c.tokens == alone(model, p, n), f"{mode}: prompt of {len(p)} tokens"
    (ev,) = events
    assert ev.action == "restarted" and "rank 2" in ev.node and ev.replayed_steps >= 1
    assert "sequence(s)" in ev.detail
    assert held == [0, 0, 0]


def test_without_restarts_a_lost_rank_fails_every_packed_request_clearly_and_nothing_hangs(tiny_models, spawner):
    model = tiny_models["gpt2"]
    work = random_requests(8, seed=43, prompt=(2, 12), new=(20, 30))
    with _ring(model, restarts=0) as ex:
        victim = ex._procs[1]
        killed = threading.Event()

        def on_token(_: int) -> None:
            if not killed.is_set():
                killed.set()
                victim.kill()

        t0 = time.monotonic()
        with ex.pipeline(concurrency=4, batching="continuous") as pipe:
            comps = [h.result(timeout=120) for h in [pipe.submit(p, max_new_tokens=n, on_token=on_token) for p, n in work]]
            with pytest.raises(ExecutorError, match="cannot replace a lost rank"):
                pipe.lanes[0].driver.send("late", None)
        took = time.monotonic() - t0
        assert ex._ring is None and not ex._procs, "the rest of the world was stopped"
    assert took < 2 * POLICY.step_timeout_s
    assert {c.finish_reason for c in comps} == {"error"}
    for c in comps:
        assert "cannot replace a lost rank" in (c.error or "") and "rank 2 (node1) exited with code -9" in (c.error or "")
