"""The local executor against the unsplit model: same tokens, same logits."""

from __future__ import annotations

import pytest

from noodle.executors import EXECUTORS, Sampling
from noodle.executors.local import LocalExecutor
from noodle.plandoc import LinkDoc

from .conformance import CUTS, FAMILIES, PROMPT_SETS, check_executor, plan_for


@pytest.mark.parametrize("prompts", PROMPT_SETS.keys())
@pytest.mark.parametrize("cuts", CUTS.keys())
@pytest.mark.parametrize("family", FAMILIES.keys())
def test_local_matches_generate(tiny_models, family, cuts, prompts):
    check_executor(LocalExecutor, tiny_models[family], CUTS[cuts], PROMPT_SETS[prompts])


def test_registry_puts_local_first():
    assert EXECUTORS.names()[0] == "local"
    assert EXECUTORS.get("local") is LocalExecutor


def test_report_counts_bytes_and_stages(tiny_models):
    model = tiny_models["llama"]
    prompts = PROMPT_SETS["padded"]
    with LocalExecutor(plan_for(model, [0, 2, 4, 6]), model) as ex:
        res = ex.generate(prompts, max_new_tokens=5)
    rep = res.report
    assert rep.batch_size == 3 and rep.new_tokens == len(res.tokens[0]) <= 5
    assert [s.start for s in rep.stages] == [0, 2, 4]
    hidden = 64
    # stages 0 and 1 hand on float32 hidden states (+ the int64 mask of the new tokens)
    per_decode = 3 * 1 * hidden * 4 + 3 * 1 * 8
    assert rep.stages[0].bytes_out_per_decode == per_decode
    prefill = 3 * 9 * hidden * 4 + 3 * 9 * 8
    assert rep.stages[0].bytes_out == prefill + per_decode * (rep.new_tokens - 1)
    assert rep.stages[2].bytes_out_per_decode == 3 * 8  # token ids back
    assert all(s.kv_cache_bytes > 0 for s in rep.stages[:2]) and rep.stages[2].kv_cache_bytes > 0
    assert rep.tokens_per_s > 0 and rep.decode_ms_p95 >= rep.decode_ms_p50 > 0
    assert rep.stages[0].compute_error_pct is not None
    d = rep.as_dict()
    assert d["stages"][1]["units"] == "block.1..block.2"


def test_sampling_is_seeded_and_differs_from_greedy(tiny_models):
    model = tiny_models["gpt2"]
    prompts = PROMPT_SETS["batch1"]
    hot = Sampling(temperature=5.0, top_k=50, top_p=0.95, seed=3)
    with LocalExecutor(plan_for(model, [0, 3, 6]), model) as ex:
        a = ex.generate(prompts, max_new_tokens=12, sampling=hot).tokens
        b = ex.generate(prompts, max_new_tokens=12, sampling=hot).tokens
        c = ex.generate(prompts, max_new_tokens=12, sampling=Sampling(temperature=5.0, seed=4)).tokens
        greedy = ex.generate(prompts, max_new_tokens=12).tokens
    assert a == b
    assert a != c and a != greedy


def test_sessions_are_released_and_independent(tiny_models):
    model = tiny_models["llama"]
    with LocalExecutor(plan_for(model, [0, 3, 6]), model) as ex:
        first = ex.generate(PROMPT_SETS["batch1"], max_new_tokens=4).tokens
        ex.generate(PROMPT_SETS["padded"], max_new_tokens=4)
        again = ex.generate(PROMPT_SETS["batch1"], max_new_tokens=4).tokens
        assert all(not st.sessions() for st in ex.stages)
    assert first == again


def test_emulation_sleeps_for_slow_nodes_and_links(tiny_models):
    model = tiny_models["gpt2"]
    links = [LinkDoc(a="node0", b="node1", bandwidth_gbps=1.0, latency_ms=20.0)]
    plan = plan_for(model, [0, 3, 6], compute_scores={"node1": 0.5}, links=links)
    notes: list[str] = []
    with LocalExecutor(plan, model, emulate=True, log=notes.append) as ex:
        rep = ex.generate(PROMPT_SETS["batch1"], max_new_tokens=3).report
    with LocalExecutor(plan, model) as ex:
        plain = ex.generate(PROMPT_SETS["batch1"], max_new_tokens=3).report
    assert rep.emulated and notes and "emulating" in notes[0]
    assert rep.stages[0].hop_ms_p50 == pytest.approx(20.0, abs=0.1)
    assert rep.stages[1].hop_ms_p50 == pytest.approx(20.0, abs=0.1)  # token back to node0
    assert rep.decode_ms_p50 >= 40.0 > plain.decode_ms_p50
