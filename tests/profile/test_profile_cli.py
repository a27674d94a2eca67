from __future__ import annotations

import json

import pytest

from noodle.cli.main import main
from noodle.models import load_model
from noodle.profile import load_units

FAST = ["--prompt-tokens", "8", "--decode-tokens", "2", "--warmup", "1", "--iterations", "2", "--module-iterations", "1"]


def test_model_init_then_profile_the_folder(tmp_path, capsys):
    folder = tmp_path / "models" / "llama"
    assert main(["model", "init", "--preset", "llama-tiny", "--out", str(folder), "--seed", "3"]) == 0
    assert "4 blocks (6 placement units), seed 3" in capsys.readouterr().out
    assert type(load_model(folder)).__name__ == "LlamaForCausalLM"
    out = tmp_path / "prof"
    assert main(["profile", "--model", str(folder), "--out", str(out), "--no-dashboard", *FAST]) == 0
    text = capsys.readouterr().out
    assert "top-3 decode bottlenecks" in text and "coverage: units 6/6 (100.0%)" in text
    units, meta = load_units(out / "metrics.jsonl")
    assert len(units) == 6 and meta["model"] == "llama"
    assert not (out / "dashboard.html").exists()


def test_profile_preset_and_config_with_dashboard(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["profile", "--preset", "gpt2-tiny", "--out", str(out), "--hooks", "generic", *FAST]) == 0
    assert (out / "dashboard.html").exists() and (out / "summary.png").exists()  # the CLI writes it by default
    assert json.loads((out / "summary.json").read_text())["strategy"] == "generic"
    cfg = tmp_path / "my-gpt2.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64,
                               "vocab_size": 128}))
    out2 = tmp_path / "p2"
    assert main(["profile", "--config", str(cfg), "--out", str(out2), "--no-dashboard", *FAST]) == 0
    units, meta = load_units(out2)
    assert [u.name for u in units] == ["embed", "block.0", "block.1", "lm_head"] and meta["model"] == "my-gpt2"


def test_model_init_from_config(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32,
                               "intermediate_size": 64, "num_attention_heads": 2, "vocab_size": 100}))
    assert main(["model", "init", "--config", str(cfg), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").exists()


def _write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (lambda t: ["profile", "--model", str(t)], "not a model folder (no config.json)"),
        (lambda t: ["profile", "--model", str(t / "missing")], "no such model folder"),
        (lambda t: ["profile", "--preset", "gpt5"], "gpt5: not a preset (gpt2, gpt2-tiny, llama-small, llama-tiny)"),
        (
            lambda t: ["profile", "--config", _write(t / "bert.json", {
                "model_type": "bert", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                "intermediate_size": 64, "vocab_size": 100})],
            "found no list of decoder blocks",
        ),
        (
            lambda t: ["profile", "--config", _write(t / "t5.json", {
                "model_type": "t5", "num_layers": 2, "d_model": 32, "num_heads": 2, "d_ff": 64, "vocab_size": 100})],
            "model_type 't5' has no causal-LM class",
        ),
        (lambda t: ["profile", "--config", str(t / "none.json")], "no such file"),
        (lambda t: ["profile"], "give exactly one of --model PATH, --config FILE.json or --preset NAME"),
        (lambda t: ["profile", "--preset", "gpt2-tiny", "--model", str(t)], "give exactly one of"),
        (lambda t: ["profile", "--preset", "gpt2-tiny", "--iterations", "0"], "iterations: must be a whole number"),
        (lambda t: ["profile", "--preset", "gpt2-tiny", "--hooks", "fancy"], "strategy: 'fancy' is not one of"),
        (lambda t: ["profile", "--preset", "gpt2-tiny", "--threads", "0"], "--threads: must be at least 1, got 0"),
        (lambda t: ["model", "init", "--out", str(t / "x")], "give exactly one of --preset NAME or --config"),
        (lambda t: ["model", "init", "--preset", "nope", "--out", str(t / "x")], "nope: not a preset"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, argv, message):
    (tmp_path / "junk.txt").write_text("not a model")
    code = main(argv(tmp_path))
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("noodle: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_bench_profile_writes_results(tmp_path, capsys):
    argv = ["bench", "profile", "--preset", "gpt2-tiny", "--rounds", "2", "--warmup", "0", "--prompt-tokens", "4",
            "--decode-tokens", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "profile_overhead.json").read_text())
    assert set(result["modes"]) == {"none", "specialized", "generic"}
    assert "decode_overhead_pct" in result["modes"]["specialized"]
    assert (tmp_path / "profile_overhead.csv").read_text().startswith("mode,")
    assert (tmp_path / "profile_overhead.png").exists()
    assert main(["bench", "profile", "--rounds", "0"]) == 2


def test_workload_longer_than_the_model_is_clamped_with_a_notice(tmp_path, capsys):
    out = tmp_path / "p"
    code = main(["profile", "--preset", "gpt2-tiny", "--prompt-tokens", "300", "--iterations", "1", "--warmup", "0",
                 "--module-iterations", "0", "--no-dashboard", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "300 + 16 = 316 exceeds the model's 256 positions; profiling 240 + 16 instead" in err  # the CLI's log on stderr
    workload = json.loads((out / "profile_config.json").read_text())["config"]
    assert (workload["prompt_tokens"], workload["decode_tokens"]) == (240, 16)


def test_default_counts_fit_the_time_budget_and_say_so(tmp_path, capsys):
    out = tmp_path / "auto"
    argv = ["profile", "--preset", "gpt2-tiny", "--out", str(out), "--no-dashboard", "--prompt-tokens", "8",
            "--decode-tokens", "2", "--module-iterations", "0", "--time-budget", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    saved = json.loads((out / "profile_config.json").read_text())
    n = saved["run"]["iterations"]
    assert 5 <= n <= 100 and saved["config"]["iterations"] == n and 2 <= saved["config"]["warmup"] <= 10
    assert f"profiling {n} iteration(s) (prefill of 8 tokens + 2 decode steps" in err


def test_automatic_count_needs_a_warm_up(capsys):
    assert main(["profile", "--preset", "gpt2-tiny", "--warmup", "0"]) != 0
    assert "--warmup 0 needs --iterations N" in capsys.readouterr().err
    assert main(["profile", "--preset", "gpt2-tiny", "--time-budget", "nan"]) != 0
    assert "--time-budget: must be between 1 and 86400 seconds, got nan" in capsys.readouterr().err
