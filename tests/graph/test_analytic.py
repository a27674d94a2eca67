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
