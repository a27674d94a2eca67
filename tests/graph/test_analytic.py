"""Analytic profiles: exact parameter counts from configs, sane per-unit costs."""

from __future__ import annotations

from pathlib import Path

import pytest

from noodle.graph.analytic import analytic_units
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
    from noodle.graph.analytic import _count_on_meta
    from noodle.graph.paramcount import facts_of, unit_params
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
    from noodle.graph.paramcount import facts_of

    raw = {"model_type": "gemma", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
           "intermediate_size": 96, "vocab_size": 300}  # fmt: skip
    assert facts_of(raw) is None and facts_of({"model_type": "llama", "hidden_size": 64}) is None
    assert facts_of({**raw, "model_type": "qwen2"}) is None  # its class's own default KV heads: built, not guessed
    with pytest.raises(ModelError, match="model_type 'gemma': counted by building the model"):
        analytic_units(raw, Workload(64, 16, 1))
    assert analytic_units(load_config(dict(raw)), Workload(64, 16, 1)).model_type == "gemma"
