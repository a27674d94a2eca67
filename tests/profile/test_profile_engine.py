from __future__ import annotations

import json
import platform
import re

import pytest
import torch

from noodle.errors import SpecError
from noodle.models import layout_of
from noodle.profile import ObservabilityEngine, ProfileConfig
from noodle.profile.jsonl import read_jsonl, write_jsonl
from noodle.profile.engine import fit_workload

FILES = ("metrics.jsonl", "summary.json", "units.json", "system_info.json", "profile_config.json",
         "dashboard.html", "summary.png")


def test_profile_writes_every_output(gpt2_profile):
    out, _, _ = gpt2_profile
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    info = json.loads((out / "system_info.json").read_text())
    assert info["cpu"]["logical_cores"] >= 1 and info["memory"]["total_bytes"] > 0
    assert info["versions"]["torch"] == torch.__version__
    capability = torch.backends.cpu.get_cpu_capability()
    assert info["cpu"]["capability"] == capability and info["cpu"]["model"].startswith(platform.processor() or platform.machine())
    run = json.loads((out / "profile_config.json").read_text())
    assert run["config"]["strategy"] == "specialized" and run["run"]["iterations"] == 4


def test_warmup_is_not_counted(gpt2_profile, small):
    _, report, _ = gpt2_profile
    for row in report.rows_of("unit", "prefill"):
        assert row["count"] == 4  # one prefill per iteration; the 2 warm-up iterations are gone
    for row in report.rows_of("unit", "decode"):
        assert row["count"] == 4 * small["decode_tokens"]
    modules = report.rows_of("module", "decode")
    assert modules and all(r["count"] == small["module_iterations"] * small["decode_tokens"] for r in modules)


def test_metrics_jsonl_round_trip_and_pandas(gpt2_profile, tmp_path):
    out, report, _ = gpt2_profile
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows == json.loads(json.dumps(list(report.rows)))
    assert rows[0]["kind"] == "run"
    write_jsonl(tmp_path / "again.jsonl", rows)
    assert read_jsonl(tmp_path / "again.jsonl") == rows
    pd = pytest.importorskip("pandas")  # present through ortools, not a direct dependency
    df = pd.read_json(out / "metrics.jsonl", lines=True)
    units = df[df.kind == "unit"]
    assert len(units) == 2 * 6  # 6 units x (prefill, decode)
    decode = units[units.phase == "decode"].set_index("name")
    assert (decode.latency_ms_p50 <= decode.latency_ms_p95).all()
    assert (decode.latency_ms_p95 <= decode.latency_ms_p99).all()
    assert (decode.latency_ms_min <= decode.latency_ms_mean).all()


def test_unit_rows_carry_bytes_shapes_and_kv(gpt2_profile, gpt2_tiny, small):
    _, report, _ = gpt2_profile
    decode = {r["name"]: r for r in report.rows_of("unit", "decode")}
    prefill = {r["name"]: r for r in report.rows_of("unit", "prefill")}
    assert decode["embed"]["modules"] == ["transformer.wte", "transformer.wpe", "transformer.drop"]
    assert decode["lm_head"]["modules"] == ["transformer.ln_f", "lm_head"]
    assert decode["block.1"]["output_shapes"] == [[1, 1, 64]]
    assert prefill["block.1"]["output_shapes"] == [[1, small["prompt_tokens"], 64]]
    assert decode["block.1"]["activation_bytes_out"] == 64 * 4
    assert decode["lm_head"]["output_shapes"] == [[1, 1, 512]]  # logits of the last position
    # tied head: its weight is counted for lm_head too, plus ln_f
    assert decode["lm_head"]["param_bytes"] == (512 * 64 + 2 * 64) * 4
    assert decode["embed"]["param_bytes"] == (512 * 64 + 256 * 64) * 4
    assert sum(decode[f"block.{i}"]["num_parameters"] for i in range(4)) == sum(
        p.numel() for p in gpt2_tiny.transformer.h.parameters()
    )
    assert decode["block.0"]["kv_bytes_per_token"] == 2 * 4 * 16 * 4
    assert decode["embed"]["kv_bytes_per_token"] == decode["lm_head"]["kv_bytes_per_token"] == 0
    assert all(r["peak_memory_bytes"] > 0 for r in decode.values())
    header = report.rows[0]
    assert "psutil" in header["memory_source"] and header["timer"] == "time.perf_counter"


def test_kv_bytes_match_the_real_cache(llama_tiny, tmp_path):
    """The analytic KV bytes per token equal what the model's cache actually holds (GQA model)."""
    engine = ObservabilityEngine(llama_tiny, tmp_path, ProfileConfig(prompt_tokens=7, decode_tokens=1, module_iterations=0))
    kv = {r["name"]: r["kv_bytes_per_token"] for r in _quick(engine).rows_of("unit", "decode")}
    with torch.inference_mode():
        cache = llama_tiny(input_ids=torch.arange(7).unsqueeze(0), use_cache=True).cache
    for i, layer in enumerate(cache.layers):
        nbytes = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        assert nbytes == kv[f"block.{i}"] * 7


def _quick(engine):
    with engine:
        return engine.profile(engine.make_inputs(), 1)


def test_summary_coverage_and_bottlenecks(gpt2_profile):
    out, report, _ = gpt2_profile
    summary = json.loads((out / "summary.json").read_text())
    assert summary["coverage"]["units"] == {"measured": 6, "total": 6, "percent": 100.0}
    leaves = summary["coverage"]["leaf_modules"]
    assert leaves["percent"] >= 90.0
    assert all(name.endswith("attn_dropout") for name in leaves["not_timed"])  # SDPA does its own dropout
    top = summary["bottlenecks"]
    assert len(top) == 3
    decode = {r["name"]: r["latency_ms_p50"] for r in report.rows_of("unit", "decode")}
    assert [t["name"] for t in top] == sorted(decode, key=lambda n: -decode[n])[:3]
    assert top[0]["share"] == pytest.approx(decode[top[0]["name"]] / sum(decode.values()), rel=1e-4)
    assert 0.5 < summary["phases"]["decode"]["attributed_share"] <= 1.05


def test_dashboard_is_self_contained_with_five_charts(gpt2_profile):
    out, _, _ = gpt2_profile
    page = (out / "dashboard.html").read_text()
    assert len(re.findall(r'<div id="chart\d"', page)) == 5
    assert not re.search(r"<script[^>]+src=['\"]https?://", page)  # plotly.js is inline
    assert "plotly.js" in page.lower() or "Plotly" in page
    for title in ("Latency per unit", "Memory timeline", "Parameters vs", "Layer-type", "Bottlenecks"):
        assert title in page
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generic_strategy_and_llama_unit_mapping(llama_tiny, tmp_path):
    cfg = ProfileConfig(model_name="llama", strategy="generic", prompt_tokens=6, decode_tokens=2, iterations=2)
    engine = ObservabilityEngine(llama_tiny, tmp_path, cfg)
    report = _quick(engine)
    layout = layout_of(llama_tiny)
    units = {r["name"]: r for r in report.rows_of("unit", "decode")}
    assert units["embed"]["modules"] == ["model.embed_tokens"]
    assert units["lm_head"]["modules"] == ["model.norm", "lm_head"]
    assert units["block.2"]["kv_bytes_per_token"] == 2 * 2 * 16 * 4
    owners = {r["name"]: r["unit"] for r in report.rows_of("module", "decode")}
    assert owners["model.layers.2.mlp.down_proj"] == "block.2"
    assert owners["model.norm"] == "lm_head"
    assert owners["model.rotary_emb"] == "shared"
    assert owners["model"] == "model"
    assert all(owners[n] == layout.unit_of_module(n) for n in owners if n.startswith("model.layers."))
    assert report.summary["coverage"]["leaf_modules"]["percent"] == 100.0
    assert report.summary["module_breakdown"].startswith("main pass")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("strategy", "fancy", "strategy: 'fancy' is not one of specialized, generic"),
        ("iterations", 0, "iterations: must be a whole number of at least 1, got 0"),
        ("prompt_tokens", -3, "prompt_tokens: must be a whole number of at least 1, got -3"),
        ("warmup", -1, "warmup: must be a whole number of at least 0, got -1"),
        ("device", "tpu", "device: 'tpu' is not one of cpu, cuda, auto"),
    ],
)
def test_bad_config_names_the_field(field, value, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        ProfileConfig(**{field: value})


def test_workload_longer_than_the_model_is_clamped_with_a_notice(gpt2_tiny, tmp_path, caplog):
    engine = ObservabilityEngine(gpt2_tiny, tmp_path, ProfileConfig(prompt_tokens=250, decode_tokens=16))
    with caplog.at_level("WARNING", logger="noodle.profile.engine"):
        inputs = engine.make_inputs()
    assert "250 + 16 = 266 exceeds the model's 256 positions; profiling 240 + 16 instead" in caplog.text
    assert (inputs.prompt_tokens, inputs.decode_tokens) == (240, 16)
    assert (engine.config.prompt_tokens, engine.config.decode_tokens) == (240, 16)


@pytest.mark.parametrize(
    ("prompt", "decode", "positions", "want"),
    [(128, 16, 1024, (128, 16)), (128, 16, 64, (48, 16)), (128, 16, 32, (24, 8)), (5, 9, 4, (3, 1)), (1, 1, 2, (1, 1))],
)
def test_fit_workload_stays_inside_the_positions(prompt, decode, positions, want):
    got = fit_workload(prompt, decode, positions)
    assert got == want
    assert got[0] >= 1 and got[1] >= 1 and sum(got) <= positions


def test_fit_workload_needs_two_positions():
    with pytest.raises(SpecError, match="1 position"):
        fit_workload(8, 8, 1)


def test_save_dashboard_before_profile_is_an_error(gpt2_tiny, tmp_path):
    with pytest.raises(SpecError, match="call profile"):
        ObservabilityEngine(gpt2_tiny, tmp_path).save_dashboard()
