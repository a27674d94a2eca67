"""The pipelined engine: many sequences in flight, each exactly what generating it alone gives."""

from __future__ import annotations

import threading
import time

import pytest

from noodle.errors import ExecutorError, SpecError
from noodle.executors import Sampling
from noodle.executors.local import LocalExecutor
from noodle.executors.scheduler import Pipeline, QueueFull, predicted_tokens_per_s

from .conformance import alone, plan_for, random_requests, reference

EOS = 2




@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
@pytest.mark.parametrize("cuts,concurrency,chunk", [([0, 2, 4, 6], 4, 0), ([0, 1, 3, 5, 6], 16, 5), ([0, 6], 3, 2)])
def test_sixteen_concurrent_sequences_equal_generate_alone(tiny_models, family, cuts, concurrency, chunk):
    model = tiny_models[family]
    work = random_requests(16, seed=len(cuts) + concurrency, prompt=(1, 24), new=(1, 12))
    with LocalExecutor(plan_for(model, cuts), model) as ex:
        with ex.pipeline(concurrency=concurrency, prefill_chunk=chunk) as pipe:
            handles = [pipe.submit(p, max_new_tokens=n) for p, n in work]
            done = [h.result(timeout=60) for h in handles]
        assert all(st.sessions() == [] for st in ex.stages), "every group's KV cache is freed"
    for (prompt, new), comp in zip(work, done):
        assert comp.tokens == alone(model, prompt, new), f"prompt of {len(prompt)} tokens"
        assert comp.finish_reason == ("stop" if comp.tokens[-1] == EOS else "length")
        assert comp.prompt_tokens == len(prompt) and comp.ttft_s is not None
        assert len(comp.itl_s) == len(comp.tokens) - 1


def test_micro_batches_equal_generate_on_the_padded_batch(tiny_models):
    model = tiny_models["llama"]
    prompts = [[5, 17, 99, 42, 7, 300, 12, 8, 41], [77, 3, 250], [9, 10, 11, 12, 13, 14], [400, 401]]
    want = reference(model, prompts, 6)[0]
    with LocalExecutor(plan_for(model, [0, 2, 4, 6]), model) as ex:
        pipe = ex.pipeline(concurrency=1, micro_batch=4)
        handles = [pipe.submit(p, max_new_tokens=6) for p in prompts]  # before start: admitted as one group
        with pipe:
            got = [h.result(timeout=60).tokens for h in handles]
    for row, (g, w) in enumerate(zip(got, want)):
        w = w[: w.index(EOS) + 1] if EOS in w else w
        assert g == w, f"row {row}"


def test_seeded_sampling_is_per_request(tiny_models):
    model = tiny_models["gpt2"]
    hot = Sampling(temperature=3.0, top_k=40, top_p=0.9, seed=11)
    prompt = [5, 17, 99, 42, 7]
    with LocalExecutor(plan_for(model, [0, 3, 6]), model) as ex:
        alone = ex.generate([prompt], max_new_tokens=10, sampling=hot).tokens[0]
        with ex.pipeline(concurrency=8) as pipe:
            noise = [pipe.submit([9, 9, i + 3], max_new_tokens=10, sampling=Sampling(temperature=2.0, seed=i)) for i in range(6)]
            mine = pipe.submit(prompt, max_new_tokens=10, sampling=hot)
            other_seed = pipe.submit(prompt, max_new_tokens=10, sampling=Sampling(temperature=3.0, top_k=40, top_p=0.9, seed=12))
            got = mine.result(timeout=60).tokens
            assert other_seed.result(timeout=60).tokens != got
            [h.result(timeout=60) for h in noise]
    alone = alone[: alone.index(EOS) + 1] if EOS in alone else alone
    assert got == alone


def test_streaming_callbacks_arrive_in_order(tiny_models):
    model = tiny_models["llama"]
    seen: dict[int, list[int]] = {i: [] for i in range(5)}
    ended: list[str] = []
    with LocalExecutor(plan_for(model, [0, 3, 6]), model) as ex, ex.pipeline(concurrency=5) as pipe:
        handles = [
            pipe.submit([10 + i, 20, 30], max_new_tokens=7, on_token=seen[i].append, on_done=lambda c: ended.append(c.request_id))
            for i in range(5)
        ]
        comps = [h.result(timeout=60) for h in handles]
    assert [seen[i] for i in range(5)] == [c.tokens for c in comps]
    assert sorted(ended) == sorted(h.id for h in handles)


def test_cancel_frees_the_sequence_within_a_step(tiny_models):
    model = tiny_models["llama"]
    first = threading.Event()
    with LocalExecutor(plan_for(model, [0, 2, 4, 6]), model) as ex, ex.pipeline(concurrency=2) as pipe:
        h = pipe.submit([5, 6, 7], max_new_tokens=200, on_token=lambda t: first.set())
        assert first.wait(30)
        h.cancel()
        comp = h.result(timeout=10)
        assert comp.finish_reason == "cancelled" and 1 <= len(comp.tokens) < 200
        deadline = time.monotonic() + 5
        while any(st.sessions() for st in ex.stages) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert all(st.sessions() == [] for st in ex.stages)
        waiting = [pipe.submit([1, 2], max_new_tokens=3) for _ in range(3)]
        assert all(w.result(timeout=30).finish_reason in ("length", "stop") for w in waiting)


def test_kv_budget_bounds_what_is_in_flight(tiny_models):
    model = tiny_models["llama"]
    with LocalExecutor(plan_for(model, [0, 3, 6]), model) as ex:
        # a budget of 40 tokens of context: one 4 + 30 request at a time, whatever the concurrency
        pipe = ex.pipeline(concurrency=8)
        pipe._kv_cap = 40
        peak = 0
        with pipe:
            handles = [pipe.submit([3, 4, 5, 6], max_new_tokens=30) for _ in range(4)]
            while not all(h.done() for h in handles):
                peak = max(peak, pipe.stats().in_flight)
                time.sleep(0.001)
            with pytest.raises(SpecError, match="KV cache"):
                pipe.submit(list(range(3, 40)), max_new_tokens=10)
        assert peak == 1
        assert all(h.result().finish_reason == "length" for h in handles)


def test_kv_capacity_comes_from_the_plans_memory(tiny_models):
    model = tiny_models["llama"]
    with LocalExecutor(plan_for(model, [0, 3, 6]), model) as ex:
        pipe = ex.pipeline()
        # llama-tiny: 2 KV heads x 16 dims x 2 (K and V) x 4 bytes = 256 bytes per token per layer
        weights = ex.stages[0].param_bytes()
        assert pipe._kv_cap == min(int((1024 * 2**20 - s.param_bytes()) // (256 * len(s.layers))) for s in ex.stages)
        assert weights > 0
        pipe.close()


def test_queue_full_and_bad_requests(tiny_models):
    model = tiny_models["gpt2"]
    with LocalExecutor(plan_for(model, [0, 6]), model) as ex:
        pipe = ex.pipeline(max_queue=2)
        pipe.submit([1, 2], max_new_tokens=2)
        pipe.submit([1, 2], max_new_tokens=2)
        with pytest.raises(QueueFull, match="max_queue 2"):
            pipe.submit([1, 2], max_new_tokens=2)
        with pytest.raises(SpecError, match="prompt"):
            pipe.submit([], max_new_tokens=2)
        with pytest.raises(SpecError, match="max_new_tokens"):
            pipe.submit([1], max_new_tokens=0)
        with pytest.raises(SpecError, match="context of 256"):
            pipe.submit([1] * 250, max_new_tokens=10)
        pipe.close()
        with pytest.raises(ExecutorError, match="not accepting"):
            pipe.submit([1, 2], max_new_tokens=2)
    for bad in (dict(concurrency=0), dict(micro_batch=0), dict(prefill_chunk=-1), dict(max_queue=0), dict(concurrency=2.5)):
        with pytest.raises(SpecError):
            Pipeline([object()], eos_token_id=2, pad_token_id=0, **bad)  # type: ignore[list-item]


class _Broken:
    """A lane that fails on one session's decode steps and passes everything else on."""

    def __init__(self, inner, bad_prompt_token: int) -> None:
        self.inner, self.name, self.bad, self.poisoned = inner, inner.name, bad_prompt_token, set()

    def run(self, msg):
        if msg.prefill and int(msg.data[0, 0]) == self.bad:
            self.poisoned.add(msg.session)
        if not msg.prefill and msg.session in self.poisoned:
            raise RuntimeError("injected fault")
        return self.inner.run(msg)

    def end(self, session):
        self.inner.end(session)


def test_a_failing_step_ends_only_its_own_request(tiny_models):
    model = tiny_models["llama"]
    with LocalExecutor(plan_for(model, [0, 3, 6]), model) as ex:
        pipe = ex.pipeline(concurrency=4)
        pipe.lanes[0] = _Broken(pipe.lanes[0], bad_prompt_token=77)
        with pipe:
            bad = pipe.submit([77, 5, 6], max_new_tokens=5)
            good = [pipe.submit([70 + i, 5, 6], max_new_tokens=5) for i in range(3)]
            comp = bad.result(timeout=30)
            assert comp.finish_reason == "error" and "injected fault" in (comp.error or "")
            assert all(g.result(timeout=30).finish_reason == "length" for g in good)
        assert all(st.sessions() == [] for st in ex.stages)


def test_close_cancels_what_does_not_finish_in_time(tiny_models):
    model = tiny_models["llama"]
    with LocalExecutor(plan_for(model, [0, 3, 6]), model) as ex:
        pipe = ex.pipeline(concurrency=1).start()
        handles = [pipe.submit([5, 6], max_new_tokens=250) for _ in range(3)]
        t0 = time.monotonic()
        pipe.close(timeout_s=0.2)
        assert time.monotonic() - t0 < 5
        reasons = [h.result(timeout=5).finish_reason for h in handles]
        assert "cancelled" in reasons
        assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("noodle-lane"))


def test_emulated_steps_take_their_planned_time(tiny_models):
    model = tiny_models["gpt2"]
    plan = plan_for(model, [0, 3, 6], compute_ms=15.0)
    with LocalExecutor(plan, model, emulate=True, log=lambda s: None) as ex, ex.pipeline(concurrency=2) as pipe:
        [h.result(timeout=60) for h in [pipe.submit([5, 6, 7], max_new_tokens=8) for _ in range(2)]]
        stats = pipe.stats()
    for lane in stats.stages:
        assert lane.step_ms_p50 >= 15.0, lane
        assert lane.planned_ms == 15.0


def test_predicted_tokens_per_s():
    # 3 stages of 10 ms: one group makes a token every 30 ms; 3+ groups saturate at 1 per 10 ms
    assert predicted_tokens_per_s(30.0, 10.0, 1) == pytest.approx(1000 / 30)
    assert predicted_tokens_per_s(30.0, 10.0, 3) == pytest.approx(100.0)
    assert predicted_tokens_per_s(30.0, 10.0, 16) == pytest.approx(100.0)
    assert predicted_tokens_per_s(30.0, 10.0, 16, batch_size=4) == pytest.approx(400.0)
    assert predicted_tokens_per_s(0.0, 10.0, 2) == 0.0


def test_steady_rate_counts_only_the_window_while_every_slot_is_busy():
    from noodle.executors.concurrent import steady_tokens_per_s
    from noodle.executors.scheduler import Completion

    def comp(ttft: float, n: int, gap: float) -> Completion:
        return Completion("r", 3, [5] * n, "length", ttft_s=ttft, itl_s=(gap,) * (n - 1))

    # two slots; requests start at 0.1, 0.2 (full from 0.2), 1.2 and 1.3 (queue dry at 1.3)
    comps = [comp(0.1, 11, 0.1), comp(0.2, 11, 0.1), comp(1.2, 3, 0.1), comp(1.3, 2, 0.1)]
    # in (0.2, 1.3]: tokens at 0.3..1.1 (9) + 0.3..1.2 (10) + 1.2, 1.3 (2) + 1.3 (1) = 22 over 1.1 s
    assert steady_tokens_per_s(comps, 2) == pytest.approx(22 / 1.1)
    assert steady_tokens_per_s(comps[:2], 2) is None


class _PerToken:
    """A lane that takes 2 ms per token it handles, so prefill chunks and decode steps have known costs."""

    def __init__(self, inner) -> None:
        self.inner, self.name = inner, inner.name

    def run(self, msg):
        time.sleep(0.002 * msg.new_tokens * msg.batch_size)
        return self.inner.run(msg)

    def end(self, session):
        self.inner.end(session)


def test_decode_steps_overtake_a_long_chunked_prefill(tiny_models):
    model = tiny_models["llama"]
    with LocalExecutor(plan_for(model, [0, 3, 6]), model) as ex:
        pipe = ex.pipeline(concurrency=4, prefill_chunk=10)
        pipe.lanes[:] = [_PerToken(lane) for lane in pipe.lanes]
        with pipe:
            started = threading.Event()
            decoder = pipe.submit([5, 6, 7], max_new_tokens=60, on_token=lambda t: started.set())
            assert started.wait(30)
            long = pipe.submit(list(range(3, 203)), max_new_tokens=2)  # 20 chunks: ~0.4 s on each lane
            gaps = decoder.result(timeout=60).itl_s
            assert long.result(timeout=60).finish_reason == "length"
    # behind the whole prefill a step would wait >= 0.4 s; overtaking, it waits for at most a chunk or two per lane
    assert max(gaps) < 0.2, max(gaps)
