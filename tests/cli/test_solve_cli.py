"""`noodle solve` and `noodle plot`: outputs, exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from noodle.cli.main import main
from noodle.plandoc import load_plan

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"


def test_solve_writes_the_plan_contract(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["solve", str(SPECS / "gpt2-home-lab.yaml"), "--out", str(out), "--format", "json"]) == 0
    stdout = capsys.readouterr().out
    printed = json.loads(stdout)  # stdout holds only the plan
    written = json.loads(out.read_text())
    assert printed["stages"] == written["stages"]
    for key in ("objective", "objective_ms", "solver", "predicted", "stages"):
        assert key in written
    assert written["solver"]["status"] == "optimal" and written["solver"]["gap"] == 0.0
    assert set(written["predicted"]) == {"token_latency_ms", "bottleneck_ms", "tokens_per_s", "pipeline_tokens_per_s"}
    pred = written["predicted"]  # the example's workload: one group in flight -> one trip per token
    assert pred["pipeline_tokens_per_s"] == pytest.approx(1e3 / pred["token_latency_ms"])
    stage = written["stages"][0]
    for key in ("stage_id", "node", "device", "layers", "expected_latency_ms", "memory_required_mb", "rationale"):
        assert key in stage
    layers = [name for s in written["stages"] for name in s["layers"]]
    assert layers == written["units"] and layers[0] == "embed" and layers[-1] == "lm_head"
    assert load_plan(out).objective_ms == written["objective_ms"]


def test_per_node_profiles_spec_is_planned_with_each_nodes_own_costs(tmp_path, capsys):
    graph = tmp_path / "g.graphml"
    assert main(["solve", str(SPECS / "per-node-profiles.yaml"), "-f", "json", "--graph", str(graph)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cost_model"] == "per-node" and doc["solver"]["status"] == "optimal"
    gpu = next(s for s in doc["stages"] if s["node"] == "desktop-gpu")
    spec = yaml.safe_load((SPECS / "per-node-profiles.yaml").read_text())
    own = {u["name"]: u["latency_ms"] for u in spec["cluster"]["nodes"][0]["profile"]["units"]}
    assert gpu["compute_ms"] == pytest.approx(sum(own[name] for name in gpu["layers"]))
    assert "its own measured profile" in gpu["rationale"]
    assert graph.read_text().count("<node ") >= 9  # the graph is written without the (non-scalar) profiles


def test_yaml_format_and_objective_override(capsys):
    assert main(["solve", str(SPECS / "inline-pins.yaml"), "-f", "yaml", "--objective", "throughput"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["objective"] == "throughput"
    assert doc["stages"][0]["node"] == "desktop-gpu" and doc["stages"][0]["layers"][:2] == ["embed", "block.0"]
    assert all(s["node"] != "nas-cpu" for s in doc["stages"]) and len(doc["stages"]) <= 2


def test_table_format_shows_status_gap_and_time(capsys):
    assert main(["solve", str(SPECS / "inline-pins.yaml")]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "optimal" in out and "gap 0.00%" in out and "bottleneck" in out


def test_infeasible_exit_code_and_message(capsys):
    assert main(["solve", str(SPECS / "infeasible.yaml")]) == 3
    err = capsys.readouterr().err
    assert "the model needs 24.49 GiB" in err and "offer 20.00 GiB" in err


def test_invalid_spec_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {layers: []}\ncluster: {nodes: []}\n")
    assert main(["solve", str(bad)]) == 2
    assert f"{bad}: model.layers" in capsys.readouterr().err


def test_unknown_solver_lists_valid_names(capsys):
    assert main(["solve", str(SPECS / "inline-pins.yaml"), "--solver", "gurobi"]) == 2
    err = capsys.readouterr().err
    assert "unknown solver 'gurobi'" in err and "auto, cpsat, milp, heuristic" in err


def test_bad_flag_values(capsys):
    assert main(["solve", str(SPECS / "inline-pins.yaml"), "--format", "xml"]) == 2
    assert main(["solve", str(SPECS / "inline-pins.yaml"), "--time-limit", "-1"]) == 2


def test_plot_writes_a_png(tmp_path):
    plan = tmp_path / "plan.json"
    assert main(["solve", str(SPECS / "inline-pins.yaml"), "--out", str(plan)]) == 0
    png = tmp_path / "plan.png"
    assert main(["plot", str(plan), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_rejects_a_non_plan(tmp_path, capsys):
    bogus = tmp_path / "x.json"
    bogus.write_text('{"stages": 3}')
    assert main(["plot", str(bogus)]) == 2
    assert "x.json" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_never_prints_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: {nodes: [{id: a}]}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "noodle.cli.main", "solve", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_graph_export_with_nodes_without_address(tmp_path, capsys):
    import networkx as nx

    out = tmp_path / "g.graphml"
    assert main(["solve", str(SPECS / "gpt2-home-lab.yaml"), "--graph", str(out), "-f", "json"]) == 0
    g = nx.read_graphml(out)
    assert g.number_of_nodes() > 0 and g.number_of_edges() > 0
    assert main(["solve", str(SPECS / "gpt2-home-lab.yaml"), "--graph", str(tmp_path / "no" / "g.graphml")]) == 2
    assert "--graph: cannot write" in capsys.readouterr().err


def test_plan_files_hold_no_float_noise(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["solve", str(SPECS / "gpt2-home-lab.yaml"), "--out", str(out), "-f", "json"]) == 0
    text = out.read_text()
    assert "00000000" not in text and "99999999" not in text


def test_piped_tables_are_not_cut_at_80_columns():
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "COLUMNS"}
    done = subprocess.run([sys.executable, "-m", "noodle", "solve", str(SPECS / "gpt2-home-lab.yaml")],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "memory MiB" in done.stdout and "…" not in done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) > 80


def test_quiet_and_verbose_flags(capsys):
    import logging

    assert main(["-q", "solve", str(SPECS / "inline-pins.yaml"), "-f", "json"]) == 0
    assert logging.getLogger("noodle").level == logging.WARNING
    assert main(["-v", "solve", str(SPECS / "inline-pins.yaml"), "-f", "json"]) == 0
    assert logging.getLogger("noodle").level == logging.DEBUG
    assert main(["solve", str(SPECS / "inline-pins.yaml"), "-f", "json"]) == 0
    assert logging.getLogger("noodle").level == logging.INFO


def test_solve_places_several_models_jointly_and_labels_each_stage(tmp_path, capsys):
    out = tmp_path / "joint.json"
    spec = SPECS / "two-models-home-lab.yaml"
    assert main(["solve", str(spec), "--out", str(out), "-f", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed["stages"] == written["stages"] and written["kind"] == "joint"
    assert written["solver"]["status"] == "optimal"
    models = {m["name"]: m for m in written["models"]}
    assert set(models) == {"chat", "summaries"}
    assert models["chat"]["tokens_per_s"] == pytest.approx(2 * models["summaries"]["tokens_per_s"])  # weights 2:1
    for name, m in models.items():
        layers = [u for s in written["stages"] if s["model"] == name for u in s["layers"]]
        assert layers == m["units"]  # each model's stages cover its chain in order
    busiest = max(n["round_ms"] for n in written["nodes"])
    assert busiest == pytest.approx(written["objective_ms"])
    for n in written["nodes"]:
        assert n["memory_used_mb"] <= n["memory_available_mb"]
    assert main(["solve", str(spec)]) == 0
    table = capsys.readouterr().out
    assert "model chat (weight 2)" in table and "model summaries (weight 1)" in table and "shared nodes" in table


def test_solve_with_models_refuses_single_model_flags_in_one_line(capsys):
    assert main(["solve", str(SPECS / "two-models-home-lab.yaml"), "--objective", "latency"]) != 0
    err = capsys.readouterr().err
    assert "--objective: not available for a spec with models" in err and "Traceback" not in err
