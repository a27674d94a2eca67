from __future__ import annotations

import pytest
import torch

from noodle.models import layout_of
from noodle.profile import ObservabilityEngine, ProfileConfig
from noodle.profile.hooks import Clock, MemoryProbe, TimingHooks, TraceHooks, timed_modules


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _forward(model, hooks, n_tokens=6):
    ids = torch.arange(n_tokens).unsqueeze(0)
    hooks.start_forward()
    with torch.inference_mode():
        out = model(input_ids=ids)
    return out.logits, hooks.finish_forward()


@pytest.mark.parametrize("family", ["gpt2_tiny", "llama_tiny"])
def test_specialized_hooks_time_every_unit_with_one_pair_per_root(family, request):
    model = request.getfixturevalue(family)
    layout = layout_of(model)
    hooks = TimingHooks(model, layout, "specialized", Clock())
    before = _hook_count(model)
    hooks.install()
    hooks.install()  # idempotent
    roots = sum(len(p) for p in layout.unit_modules().values())
    assert _hook_count(model) - before == 2 * roots
    _, (units, modules) = _forward(model, hooks)
    assert list(units) == layout.unit_names
    assert all(ms > 0 for ms in units.values())
    assert modules == {}
    hooks.remove()
    assert _hook_count(model) == before


def test_multi_module_units_span_first_pre_to_last_post(gpt2_tiny):
    """GPT-2's embed is wte+wpe+drop and lm_head is ln_f+lm_head: the unit spans all of them."""
    layout = layout_of(gpt2_tiny)
    hooks = TimingHooks(gpt2_tiny, layout, "generic", Clock())
    hooks.install()
    try:
        _, (units, modules) = _forward(gpt2_tiny, hooks)
    finally:
        hooks.remove()
    embed_parts = ["transformer.wte", "transformer.wpe", "transformer.drop"]
    assert units["embed"] >= sum(modules[m] for m in embed_parts)
    assert units["lm_head"] >= modules["transformer.ln_f"] + modules["lm_head"]
    for i in range(layout.num_blocks):
        assert units[f"block.{i}"] == pytest.approx(modules[f"transformer.h.{i}"], rel=0.5, abs=0.5)


def test_generic_hooks_time_every_module_that_runs(llama_tiny):
    layout = layout_of(llama_tiny)
    hooks = TimingHooks(llama_tiny, layout, "generic", Clock())
    hooks.install()
    try:
        _, (units, modules) = _forward(llama_tiny, hooks)
    finally:
        hooks.remove()
    names = [n for n, _ in timed_modules(llama_tiny)]
    assert set(modules) == set(names)  # every Llama module runs (rotary included)
    assert len(units) == layout.num_blocks + 2


def test_hooks_do_not_change_the_output(gpt2_tiny):
    layout = layout_of(gpt2_tiny)
    plain, _ = _forward(gpt2_tiny, TimingHooks(gpt2_tiny, layout, "specialized", Clock()))
    for strategy in ("specialized", "generic"):
        hooks = TimingHooks(gpt2_tiny, layout, strategy, Clock())
        hooks.install()
        try:
            logits, _ = _forward(gpt2_tiny, hooks)
        finally:
            hooks.remove()
        assert torch.equal(logits, plain)


def test_trace_hooks_record_shapes_bytes_and_memory(gpt2_tiny):
    layout = layout_of(gpt2_tiny)
    trace = TraceHooks(gpt2_tiny, layout, MemoryProbe())
    trace.install()
    try:
        _forward(gpt2_tiny, trace, n_tokens=5)
    finally:
        trace.remove()
    assert set(trace.units) == set(layout.unit_names)
    embed, block = trace.units["embed"], trace.units["block.0"]
    assert embed.input_shapes == [[1, 5]]  # input ids of wte, the unit's first module
    assert embed.output_shapes == [[1, 5, 64]]  # output of drop, its last module
    assert block.output_shapes == [[1, 5, 64]]
    assert block.activation_bytes_out == 5 * 64 * 4
    assert trace.units["lm_head"].output_shapes == [[1, 5, 512]]
    assert block.memory_after_bytes > 0 and block.peak_memory_bytes >= block.memory_after_bytes
    assert [u for u, _ in trace.timeline][-2:] == ["lm_head", "lm_head"]  # ln_f, then the head


def test_unknown_strategy_is_refused(gpt2_tiny):
    with pytest.raises(ValueError, match="specialized, generic"):
        TimingHooks(gpt2_tiny, layout_of(gpt2_tiny), "fancy", Clock())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events_and_gpu_memory(tmp_path, gpt2_tiny):
    import copy

    model = copy.deepcopy(gpt2_tiny)
    engine = ObservabilityEngine(model, tmp_path, ProfileConfig(device="cuda", prompt_tokens=8, decode_tokens=2,
                                                                iterations=2, module_iterations=1))
    assert engine.clock.cuda and engine.probe.cuda
    with engine:
        report = engine.profile(engine.make_inputs(), 2)
    assert report.summary["timer"] == "cuda events"
    assert all(r["latency_ms_p50"] > 0 for r in report.rows_of("unit", "decode"))
    assert all(r["peak_memory_bytes"] > 0 for r in report.rows_of("unit", "decode"))
