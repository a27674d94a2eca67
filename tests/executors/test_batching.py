"""Continuous batching: packed stage steps and the scheduler that rebuilds its batches every step."""

from __future__ import annotations

import threading

import pytest
import torch

from noodle.errors import ExecutorError, SpecError
from noodle.executors.batching import BatchingPipeline, make_pipeline, resolve_batching
from noodle.executors.local import LocalExecutor
from noodle.executors.messages import SeqChunk, StageInput, StageOutput
from noodle.executors.stage import StageRunner

from .conformance import alone, plan_for, random_requests

EOS = 2
PROMPTS = [[5, 17, 99, 42, 7, 300, 12, 8, 41], [77, 3, 250], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [400]]


def _through(stages: list[StageRunner], msg: StageInput) -> StageOutput:
    for st in stages:
        out = st.step(msg)
        msg = out.next_input(prefill=msg.prefill)
    return out


def _alone_logits(stages: list[StageRunner], prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    tokens, logits = [], []
    out = _through(stages, StageInput("ref", torch.tensor([prompt]), None, prefill=True))
    for _ in range(steps):
        row = out.data[:, -1]
        logits.append(row)
        tokens.append(int(row.argmax()))
        out = _through(stages, StageInput("ref", torch.tensor([[tokens[-1]]]), None, prefill=False))
    for st in stages:
        st.end_session("ref")
    return tokens, logits


def packed_vs_alone(folder, cuts: list[int], *, exact: bool = False, chunk: int = 4, steps: int = 5) -> float:
    """Staggered sequences (chunked prompts beside decodes) in packed steps; the largest logit error vs alone."""
    stages = [StageRunner(folder, a, b) for a, b in zip(cuts, cuts[1:])]
    want = [_alone_logits(stages, p, steps) for p in PROMPTS]
    fed = [0] * len(PROMPTS)
    got: list[list[int]] = [[] for _ in PROMPTS]
    worst = 0.0
    for step in range(4 * steps + 8):
        chunks, data = [], []
        for i, p in enumerate(PROMPTS):
            if len(got[i]) >= steps or step < i:
                continue
            if fed[i] < len(p):
                n = min(chunk, len(p) - fed[i])
                chunks.append(SeqChunk(f"s{i}", n, start=fed[i] == 0, logits=fed[i] + n == len(p)))
                data += p[fed[i] : fed[i] + n]
                fed[i] += n
            else:
                chunks.append(SeqChunk(f"s{i}", 1, logits=True))
                data.append(got[i][-1])
        if not chunks:
            break
        out = _through(stages, StageInput("batch", torch.tensor([data]), seqs=tuple(chunks), exact=exact))
        assert out.data.shape[0] == sum(c.logits for c in chunks) and out.seqs == tuple(chunks)
        rows = iter(range(out.data.shape[0]))
        for c in chunks:
            if c.logits:
                i, row = int(c.seq[1:]), out.data[next(rows), -1]
                worst = max(worst, float((row - want[i][1][len(got[i])][0]).abs().max()))
                got[i].append(int(row.argmax()))
    assert got == [w[0] for w in want]
    for st in stages:
        for i in range(len(PROMPTS)):
            assert (st.cache_bytes(f"s{i}") > 0) == bool(st.layers)
            st.end_session(f"s{i}")
        assert st.sessions() == []
    return worst


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral", "qwen2"])
@pytest.mark.parametrize("cuts", [[0, 6], [0, 2, 4, 6], [0, 1, 3, 5, 6]])
def test_packed_steps_give_each_sequence_alone(tiny_models, family, cuts):
    assert packed_vs_alone(tiny_models[family], cuts) < 1e-5


def test_exact_packed_steps_run_each_sequence_on_its_own(tiny_models):
    assert packed_vs_alone(tiny_models["llama"], [0, 2, 4, 6], exact=True, chunk=100) == 0.0


def test_packed_step_input_is_checked(tiny_models):
    first = StageRunner(tiny_models["llama"], 0, 2)
    with pytest.raises(ExecutorError, match=r"needs data of shape \(1, 3\)"):
        first.step(StageInput("b", torch.tensor([[1, 2]]), seqs=(SeqChunk("a", 3, start=True),)))
    with pytest.raises(ExecutorError, match="unknown sequence 'a'"):
        first.step(StageInput("b", torch.tensor([[1]]), seqs=(SeqChunk("a", 1),)))
    with pytest.raises(ExecutorError, match="appears twice"):
        first.step(StageInput("b", torch.tensor([[1, 2]]), seqs=(SeqChunk("a", 1, start=True), SeqChunk("a", 1))))
    with pytest.raises(ValueError, match="tokens must be an integer >= 1"):
        SeqChunk("a", 0)
    with pytest.raises(ValueError, match="tokens must be an integer >= 1"):
        SeqChunk("a", True)  # type: ignore[arg-type]


def test_blocks_grow_without_losing_the_cache(tiny_models):
    """A sequence longer than one KV block (64) keeps every token: its logits stay those of running it alone."""
    stages = [StageRunner(tiny_models["llama"], 0, 6)]
    prompt = [(7 * i) % 500 + 3 for i in range(150)]
    want, _ = _alone_logits(stages, prompt, 4)
    out = _through(stages, StageInput("b", torch.tensor([prompt[:70]]), seqs=(SeqChunk("x", 70, start=True),)))
    out = _through(stages, StageInput("b", torch.tensor([prompt[70:]]), seqs=(SeqChunk("x", 80, logits=True),)))
    got = [int(out.data[0, -1].argmax())]
    for _ in range(3):
        out = _through(stages, StageInput("b", torch.tensor([[got[-1]]]), seqs=(SeqChunk("x", 1, logits=True),)))
        got.append(int(out.data[0, -1].argmax()))
    assert got == want


class _Recorder:
    """Wraps a lane and records the chunks of every step it runs."""

    def __init__(self, lane) -> None:
        self.lane, self.name, self.packed_steps = lane, lane.name, True
        self.steps: list[tuple[SeqChunk, ...]] = []
        self.fail_on: int | None = None  # a token id that makes the step fail

    def run(self, msg):
        self.steps.append(msg.seqs)
        if self.fail_on is not None and not msg.data.is_floating_point() and bool((msg.data == self.fail_on).any()):
            raise RuntimeError("boom")
        return self.lane.run(msg)

    def end(self, session):
        self.lane.end(session)


def _pipe(ex: LocalExecutor, **kw) -> tuple[BatchingPipeline, list[_Recorder]]:
    base = ex.pipeline(batching="continuous", **kw)
    lanes = [_Recorder(lane) for lane in base.lanes]
    return make_pipeline(lanes, batching="exact" if kw.get("batching") == "exact" else "continuous",  # type: ignore[return-value]
                         max_batch_tokens=base.max_batch_tokens, eos_token_id=EOS, pad_token_id=0,
                         concurrency=base.concurrency, prefill_chunk=base.prefill_chunk,
                         kv_capacity_tokens=[base._kv_cap]), lanes  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["continuous", "exact"])
@pytest.mark.parametrize("cuts,concurrency,chunk,budget", [([0, 6], 8, 0, 256), ([0, 2, 4, 6], 6, 5, 16),
                                                           ([0, 1, 3, 5, 6], 16, 0, 12)])  # fmt: skip
def test_sixteen_requests_batched_equal_generate_alone(tiny_models, family, mode, cuts, concurrency, chunk, budget):
    model = tiny_models[family]
    work = random_requests(16, seed=len(cuts) + concurrency, prompt=(1, 24), new=(1, 12))
    with LocalExecutor(plan_for(model, cuts), model) as ex:
        with ex.pipeline(concurrency=concurrency, prefill_chunk=chunk, batching=mode, max_batch_tokens=budget) as pipe:
            handles = [pipe.submit(p, max_new_tokens=n) for p, n in work]
            done = [h.result(timeout=120) for h in handles]
            stats = pipe.stats()
        assert all(st.sessions() == [] for st in ex.stages), "every sequence's KV cache is freed"
    assert stats.peak_in_flight == min(concurrency, 16) and stats.kv_reserved_tokens == 0
    for (prompt, new), comp in zip(work, done):
        assert comp.tokens == alone(model, prompt, new), f"prompt of {len(prompt)} tokens"
        assert comp.finish_reason == ("stop" if comp.tokens[-1] == EOS else "length")
        assert len(comp.itl_s) == len(comp.tokens) - 1


def test_one_step_carries_every_running_sequence_and_new_prefills(tiny_models):
    """Decode tokens of all running sequences and prefill chunks of new ones share a step, under the budget."""
    model = tiny_models["llama"]
    with LocalExecutor(plan_for(model, [0, 6]), model) as ex:
        pipe, (lane,) = _pipe(ex, concurrency=8, max_batch_tokens=20)
        first = [pipe.submit([3 + i, 4, 5, 6, 7], max_new_tokens=12) for i in range(4)]
        with pipe:
            for h in first:
                while not h.done() and not pipe._by_rid[h.id].tokens:
                    threading.Event().wait(0.005)
            late = [pipe.submit([9, 8, 7, 6, 5, 4, 3, 2, 11, 12, 13, 14, 15, 16, 17, 18, 19], max_new_tokens=3)
                    for _ in range(2)]  # fmt: skip
            for h in first + late:
                h.result(timeout=60)
    assert max(len(s) for s in lane.steps) >= 5, "many sequences in one forward"
    for seqs in lane.steps:
        decodes = sum(1 for c in seqs if c.tokens == 1 and not c.start)
        assert sum(c.tokens for c in seqs) <= max(20, decodes), seqs
    mixed = [s for s in lane.steps if any(c.start for c in s) and any(not c.start and c.tokens == 1 for c in s)]
    assert mixed, "a new request's prefill rode along with running decodes"


def test_cancel_and_a_failing_step_free_every_sequence(tiny_models):
    model = tiny_models["gpt2"]
    with LocalExecutor(plan_for(model, [0, 3, 6]), model) as ex:
        pipe, lanes = _pipe(ex, concurrency=4)
        with pipe:
            long = pipe.submit([5, 6, 7], max_new_tokens=200)
            while not pipe._by_rid[long.id].tokens:
                threading.Event().wait(0.005)
            long.cancel()
            comp = long.result(timeout=60)
            assert comp.finish_reason == "cancelled" and 0 < len(comp.tokens) < 200
            lanes[0].fail_on = 499
            bad = pipe.submit([9, 499, 9], max_new_tokens=5)
            got = bad.result(timeout=60)
            assert got.finish_reason == "error" and "boom" in (got.error or "")
            lanes[0].fail_on = None
            assert pipe.submit([4, 4], max_new_tokens=4).result(timeout=60).finish_reason in ("length", "stop")
        assert all(st.sessions() == [] for st in ex.stages)


def test_modes_are_checked_and_auto_picks_what_the_lanes_take(tiny_models):
    model = tiny_models["llama"]
    with LocalExecutor(plan_for(model, [0, 6]), model) as ex:
        lanes = ex.pipeline().lanes
        assert resolve_batching("auto", lanes) == "continuous"
        assert isinstance(ex.pipeline(batching="auto"), BatchingPipeline)
        with pytest.raises(SpecError, match="--batching: must be one of auto, continuous, exact, groups"):
            ex.pipeline(batching="paged")
        with pytest.raises(SpecError, match="--micro-batch"):
            ex.pipeline(batching="continuous", micro_batch=2)
        with pytest.raises(SpecError, match="--max-batch-tokens: must be an integer >= 1"):
            ex.pipeline(batching="continuous", max_batch_tokens=0)

    class Remote:
        name = "far"

    assert resolve_batching("auto", [Remote()]) == "groups"
    with pytest.raises(SpecError, match=r"stages \(far\) do not take packed steps"):
        make_pipeline([Remote()], batching="continuous", eos_token_id=2, pad_token_id=0)  # type: ignore[list-item]


class _Corrupt(_Recorder):
    """The last lane, giving back the wrong number of logits rows, or NaN logits, when a token id is in the step."""

    def __init__(self, lane, first) -> None:
        super().__init__(lane)
        self.first = first  # the first lane's recorder: its last step's token ids tell which requests are in
        self.rows_on: int | None = None
        self.nan_on: int | None = None

    def run(self, msg):
        out = self.lane.run(msg)
        ids = self.first.last_ids
        if self.rows_on is not None and self.rows_on in ids:
            return StageOutput(out.session, out.data[:-1], None, True, out.seqs)
        if self.nan_on is not None and self.nan_on in ids:
            return StageOutput(out.session, torch.full_like(out.data, float("nan")), None, True, out.seqs)
        return out


class _Ids(_Recorder):
    def run(self, msg):
        self.last_ids = set(msg.data.flatten().tolist())
        return super().run(msg)


def test_bad_logits_fail_their_step_or_request_and_the_engine_goes_on(tiny_models):
    model = tiny_models["llama"]
    with LocalExecutor(plan_for(model, [0, 3, 6]), model) as ex:
        base = ex.pipeline(batching="continuous")
        first = _Ids(base.lanes[0])
        last = _Corrupt(base.lanes[1], first)
        pipe = make_pipeline([first, last], batching="continuous", eos_token_id=EOS, pad_token_id=0, concurrency=4)
        with pipe:
            last.rows_on = 451
            got = pipe.submit([3, 451, 9], max_new_tokens=4).result(timeout=60)
            assert got.finish_reason == "error" and "logits for 1 sequence" in (got.error or "")
            last.rows_on, last.nan_on = None, 452
            got = pipe.submit([3, 452, 9], max_new_tokens=4).result(timeout=60)
            assert got.finish_reason == "error" and "sampling failed" in (got.error or "")
            last.nan_on = None
            ok = pipe.submit([3, 4, 5], max_new_tokens=4).result(timeout=60)
            assert ok.tokens == alone(model, [3, 4, 5], 4), "the engine goes on"
        assert all(st.sessions() == [] for st in ex.stages)


def test_a_dead_scheduler_refuses_new_requests(tiny_models):
    model = tiny_models["llama"]
    with LocalExecutor(plan_for(model, [0, 6]), model) as ex:
        pipe = ex.pipeline(batching="continuous")

        def boom(*_a, **_k):
            raise RuntimeError("scheduler bug")

        pipe._on_logits = boom  # type: ignore[method-assign]
        with pipe:
            got = pipe.submit([3, 4, 5], max_new_tokens=4).result(timeout=60)
            assert got.finish_reason == "cancelled" and "scheduler failed: scheduler bug" in (got.error or "")
            assert not pipe.accepting
            with pytest.raises(ExecutorError, match="not accepting"):
                pipe.submit([3], max_new_tokens=1)


def test_exact_mode_reads_prompts_whole_and_prefill_gets_a_share_beside_many_decodes(tiny_models):
    model = tiny_models["llama"]
    long = [(5 * i) % 400 + 3 for i in range(40)]
    with LocalExecutor(plan_for(model, [0, 6]), model) as ex:
        base = ex.pipeline(batching="exact")
        lane = _Recorder(base.lanes[0])
        pipe = make_pipeline([lane], batching="exact", max_batch_tokens=8, eos_token_id=EOS, pad_token_id=0,
                             concurrency=4)  # fmt: skip
        with pipe:
            got = pipe.submit(long, max_new_tokens=3).result(timeout=60)
        assert any(c.start and c.tokens == 40 for s in lane.steps for c in s), "exact mode: one chunk of 40 > budget 8"
        assert got.tokens == alone(model, long, 3)
        base = ex.pipeline(batching="continuous")
        lane = _Recorder(base.lanes[0])
        pipe = make_pipeline([lane], batching="continuous", max_batch_tokens=8, eos_token_id=EOS, pad_token_id=0,
                             concurrency=12)  # fmt: skip
        with pipe:
            hs = [pipe.submit([3 + i, 4], max_new_tokens=30) for i in range(10)]
            late = pipe.submit(long, max_new_tokens=2)
            late.result(timeout=120)
            for h in hs:
                h.result(timeout=120)
        crowded = [s for s in lane.steps if sum(1 for c in s if c.tokens == 1 and not c.start) >= 8]
        assert any(any(c.tokens > 1 for c in s) for s in crowded), "a prompt is read beside 8+ decodes (a quarter of the budget)"


@pytest.mark.parametrize("cuts", [[0, 6], [0, 2, 4, 6]])
def test_kv_pressure_preempts_and_recomputes_without_losing_a_token(tiny_models, cuts):
    """A KV budget far below every request's context: sequences are preempted and read again, tokens unchanged."""
    model = tiny_models["llama"]
    work = random_requests(10, seed=7, prompt=(8, 30), new=(40, 60))
    cap = 160  # every request needs 48-90 tokens; ten at once need ~700
    with LocalExecutor(plan_for(model, cuts), model) as ex:
        base = ex.pipeline(concurrency=8, batching="continuous")
        pipe = make_pipeline(base.lanes, batching="continuous", eos_token_id=EOS, pad_token_id=0, concurrency=8,
                             max_batch_tokens=32, kv_capacity_tokens=[cap])  # fmt: skip
        seen: list[int] = []
        with pipe:
            handles = [pipe.submit(p, max_new_tokens=n) for p, n in work]
            while not all(h.done() for h in handles):
                seen.append(pipe.stats().kv_reserved_tokens)
                threading.Event().wait(0.002)
            done = [h.result(timeout=120) for h in handles]
            stats = pipe.stats()
        assert all(st.sessions() == [] for st in ex.stages), "preempted and finished sequences leave no KV behind"
    assert stats.preemptions > 0, "the budget forces preemption"
    assert max(seen) <= cap and stats.kv_reserved_tokens == 0
    assert stats.peak_in_flight > 2, "admission does not reserve whole contexts up front"
    for (prompt, new), comp in zip(work, done):
        assert comp.tokens == alone(model, prompt, new)
        assert len(comp.tokens) == new or comp.tokens[-1] == EOS


def test_exact_mode_reserves_whole_contexts_and_never_preempts(tiny_models):
    model = tiny_models["llama"]
    work = random_requests(6, seed=3, prompt=(8, 30), new=(40, 60))
    with LocalExecutor(plan_for(model, [0, 6]), model) as ex:
        base = ex.pipeline(concurrency=8, batching="exact")
        pipe = make_pipeline(base.lanes, batching="exact", eos_token_id=EOS, pad_token_id=0, concurrency=8,
                             kv_capacity_tokens=[160])  # fmt: skip
        with pipe:
            done = [h.result(timeout=120) for h in [pipe.submit(p, max_new_tokens=n) for p, n in work]]
            stats = pipe.stats()
    assert stats.preemptions == 0 and stats.peak_in_flight <= 2
    for (prompt, new), comp in zip(work, done):
        assert comp.tokens == alone(model, prompt, new)
