from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noodle.models import load_config
from noodle.profile.metrics import (
    bottlenecks,
    kv_bytes_per_token,
    latency_stats,
    leaf_coverage,
    param_stats,
    percentile,
)

floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(floats, min_size=1, max_size=60), st.floats(min_value=0, max_value=100))
def test_percentile_matches_numpy(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-6)


@pytest.mark.parametrize("q", [0, 50, 95, 99, 100])
def test_percentile_fixed_points(q):
    values = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0, 7.0]
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_stats_columns():
    samples = [float(x) for x in range(1, 101)]
    s = latency_stats(samples)
    assert (s.count, s.min, s.max, s.mean) == (100, 1.0, 100.0, 50.5)
    assert s.p50 == pytest.approx(np.percentile(samples, 50))
    assert s.p99 == pytest.approx(np.percentile(samples, 99))
    assert s.std == pytest.approx(np.std(samples))
    row = s.as_row()
    assert set(row) == {"count", *(f"latency_ms_{k}" for k in ("mean", "std", "min", "p50", "p95", "p99", "max"))}


def test_kv_bytes_per_token_gpt2_small_and_gqa():
    gpt2 = load_config("gpt2")  # 12 heads x 64 dims, no GQA
    assert kv_bytes_per_token(gpt2, 4) == 2 * 12 * 64 * 4 == 6144
    llama = load_config("llama-tiny")  # 4 heads, 2 KV heads, 64 wide -> head_dim 16
    assert kv_bytes_per_token(llama, 2) == 2 * 2 * 16 * 2


def test_param_stats_counts_a_tied_head_again(gpt2_tiny):
    head_count, head_bytes = param_stats([gpt2_tiny.lm_head])
    assert head_count == gpt2_tiny.lm_head.weight.numel() == 512 * 64
    assert head_bytes == head_count * 4
    both, _ = param_stats([gpt2_tiny.transformer.wte, gpt2_tiny.lm_head])  # the same tensor, counted once
    assert both == head_count


def test_bottlenecks_and_coverage():
    top = bottlenecks({"a": 1.0, "b": 3.0, "c": 2.0, "d": 4.0}, top=3)
    assert [t["name"] for t in top] == ["d", "b", "c"]
    assert top[0]["share"] == pytest.approx(0.4)
    cov = leaf_coverage(["x", "y", "z", "w"], ["x", "y", "z", "extra"])
    assert (cov["timed"], cov["total"], cov["percent"], cov["not_timed"]) == (3, 4, 75.0, ["w"])

