"""Analytic profiles: exact parameter counts from configs, sane per-unit costs."""

from __future__ import annotations

from pathlib import Path

import pytest

from noodle.models.analytic import ReferenceDevice, analytic_units
from noodle.models import load_config
from noodle.types import Workload

CONFIGS = Path(__file__).resolve().parents[2] / "specs" / "models"
PUBLISHED = {  # published parameter counts
    "gpt2-small.json": 124_000_000,
    "llama-2-7b.json": 6_740_000_000,
    "llama-2-13b.json": 13_000_000_000,
    "llama-2-70b.json": 70_000_000_000,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name):
    model = analytic_units(load_config(CONFIGS / name), Workload(256, 64, 1))
    assert abs(model.num_parameters - PUBLISHED[name]) / PUBLISHED[name] < 0.02
    assert len(model.units) == load_config(CONFIGS / name).num_hidden_layers + 2


def test_exact_counts_and_kv_bytes():
    gpt2 = analytic_units(load_config(CONFIGS / "gpt2-small.json"), Workload(256, 64, 1))
    assert gpt2.num_parameters == 124_439_808 and gpt2.tied_lm_head
    assert gpt2.units[1].kv_bytes_per_token == 2 * 768 * 4
    assert gpt2.units[-1].param_bytes == (768 * 50257 + 2 * 768) * 4  # tied head charged in full (+ ln_f)
    llama70 = analytic_units(load_config(CONFIGS / "llama-2-70b.json"), Workload(256, 64, 1))
    assert llama70.num_parameters == 68_976_648_192
    assert llama70.units[1].kv_bytes_per_token == 2 * 8 * 128 * 2  # GQA: 8 KV heads, fp16
    assert llama70.dtype == "float16"


def test_latency_is_memory_bound_for_decode():
    model = analytic_units(load_config(CONFIGS / "llama-2-7b.json"), Workload(128, 64, 1))
    block = model.units[1]
    # ~202M params x 2 bytes / 50 GB/s ~ 8 ms on the default reference device
    assert 7.0 < block.latency_ms < 10.0
    bigger_batch = analytic_units(load_config(CONFIGS / "llama-2-7b.json"), Workload(128, 64, 8))
    assert bigger_batch.units[1].activation_bytes == 8 * block.activation_bytes


def _tiny(kind: str, **extra: object) -> dict:
    base = {"model_type": kind, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 96, "vocab_size": 300, "max_position_embeddings": 128}  # fmt: skip
    if kind == "gpt2":
        base = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 300, "n_positions": 128}
    return {**base, **extra}


FAMILY_CASES = [
    _tiny("gpt2"), _tiny("gpt2", n_inner=80, tie_word_embeddings=False), _tiny("llama"),
    _tiny("llama", num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    _tiny("llama", head_dim=32), _tiny("mistral", num_key_value_heads=1, sliding_window=16), _tiny("qwen2", num_key_value_heads=4),
    _tiny("qwen2", num_key_value_heads=2, tie_word_embeddings=True),
]  # fmt: skip


@pytest.mark.parametrize("raw", FAMILY_CASES + [f.name for f in sorted(CONFIGS.glob("*.json"))], ids=str)
def test_counts_from_the_config_alone_equal_the_model_built_on_meta(raw):
    """The torch-free count (paramcount) and the meta-device build agree unit by unit."""
    from noodle.models.analytic import _count_on_meta
    from noodle.models.paramcount import facts_of, unit_params
    from noodle.models.loading import check_config_file

    data = dict(check_config_file(CONFIGS / raw)) if isinstance(raw, str) else dict(raw)
    facts = facts_of(data)
    assert facts is not None
    mine, built = unit_params(facts), _count_on_meta(load_config(dict(data)))
    assert mine == built
    ours = analytic_units(data, Workload(64, 16, 2))
    theirs = analytic_units(load_config(dict(data)), Workload(64, 16, 2))
    assert ours == theirs


def test_other_families_need_the_model_built_and_say_so():
    from noodle.errors import ModelError
    from noodle.models.paramcount import facts_of

    raw = {"model_type": "gemma", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
           "intermediate_size": 96, "vocab_size": 300}  # fmt: skip
    assert facts_of(raw) is None and facts_of({"model_type": "llama", "hidden_size": 64}) is None
    assert facts_of({**raw, "model_type": "qwen2"}) is None  # its class's own default KV heads: built, not guessed
    with pytest.raises(ModelError, match="model_type 'gemma': counted by building the model"):
        analytic_units(raw, Workload(64, 16, 1))
    assert analytic_units(load_config(dict(raw)), Workload(64, 16, 1)).model_type == "gemma"


def _old_figure(config, unit, batch, ref=ReferenceDevice()):
    """The analytic step of ``unit`` at ``batch`` as the roofline formula writes it (max of FLOPs and bytes)."""
    text = config
    hidden, nb = text.hidden_size, 4
    heads = text.num_attention_heads
    hd = hidden // heads
    avg = 256 + 64 / 2
    params = unit.param_bytes // nb
    if unit.name == "embed":  # reads one row per sequence of each of its tables, no weights read whole
        return batch * unit.latency_at(1)
    if unit.name == "lm_head":
        return ref.time_ms(2.0 * batch * params, params * nb + batch * hidden * nb)
    kv = 2 * heads * hd * nb
    return ref.time_ms(2.0 * batch * params + 4.0 * batch * avg * heads * hd,
                       params * nb + kv * avg * batch + 2 * batch * hidden * nb)


def test_batch_curve_is_the_roofline_monotone_and_the_old_figure_at_batch_one():
    config = load_config(CONFIGS / "gpt2-small.json")
    one = analytic_units(config, Workload(256, 64, 1))
    eight = analytic_units(config, Workload(256, 64, 8))
    for u, u8 in zip(one.units, eight.units):
        assert u.curve is not None and u.curve == u8.curve  # the curve does not depend on the batch built at
        assert u.latency_at(1) == u.latency_ms == pytest.approx(_old_figure(config, u, 1), rel=1e-12)
        assert u.latency_at(8) == u8.latency_ms == pytest.approx(_old_figure(config, u, 8), rel=1e-12)
        steps = [u.latency_at(b) for b in range(1, 65)]
        assert all(a <= b for a, b in zip(steps, steps[1:])), u.name
        assert steps[-1] > steps[0]  # a batch of 64 costs more than one sequence
    block = one.units[1]
    # memory-bound at small batches: 8 sequences cost far less than 8 single steps, but more than one
    assert block.latency_at(1) < block.latency_at(8) < 8 * block.latency_at(1)
    # at large batches the weights no longer count: each sequence adds its own FLOPs or reads, whichever is more
    c = block.curve
    big = 100_000
    per_row = max(c.row_compute_ms, c.row_read_ms)
    assert block.latency_at(2 * big) - block.latency_at(big) == pytest.approx(big * per_row, rel=1e-9)
