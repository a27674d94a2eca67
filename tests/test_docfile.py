"""Bad spec and plan files through the CLI: one line naming the file and field, exit 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from noodle.cli.main import main
from noodle.docfile import MAX_DEPTH, MAX_DOCUMENT_BYTES, parse_document
from noodle.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]
SPEC = (ROOT / "specs" / "inline-pins.yaml").read_text()


def _one_line(capsys: pytest.CaptureFixture[str], rc: int, *needles: str, want_rc: int = 2) -> str:
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert rc == want_rc, err
    assert "Traceback" not in cap.out + cap.err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("noodle: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _solve(tmp_path: Path, text: str | bytes) -> int:
    path = tmp_path / "spec.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return main(["solve", str(path), "-f", "json"])


def test_spec_not_utf8(tmp_path, capsys):
    rc = _solve(tmp_path, SPEC.encode().replace(b"inline-pins", b"inline-\xff\xfepins"))
    _one_line(capsys, rc, "spec.yaml", "not valid UTF-8", "byte 0xff", "line 3")


@pytest.mark.parametrize(
    "old, new, field",
    [
        ("memory_gb: 0.25", "memory_gb: .inf", "cluster.nodes[0].memory_gb"),
        ("memory_gb: 0.25", "memory_gb: 1e400", "cluster.nodes[0].memory_gb"),
        ("memory_gb: 0.25", "memory_gb: .nan", "cluster.nodes[0].memory_gb"),
        ("compute_score: 6.0", "compute_score: .inf", "cluster.nodes[0].compute_score"),
        ("compute_score: 6.0", "compute_score: -.inf", "cluster.nodes[0].compute_score"),
        ("compute_score: 6.0", "compute_score: 1e-320", "cluster.nodes[0].compute_score"),
        ("latency_ms: 0.05", "latency_ms: .inf", "model.layers[0].latency_ms"),
        ("latency_ms: 0.05", "latency_ms: .nan", "model.layers[0].latency_ms"),
        ("bandwidth_gbps: 1.0", "bandwidth_gbps: .inf", "cluster.links.default.bandwidth_gbps"),
        ("bandwidth_gbps: 10", "bandwidth_gbps: .nan", "cluster.links.pairs[0].bandwidth_gbps"),
        ("latency_ms: 0.5}", "latency_ms: .inf}", "cluster.links.default.latency_ms"),
        ("param_bytes: 154389504, activation_bytes: 3072, kv", "param_bytes: " + "1" + "0" * 30 + ", activation_bytes: 3072, kv", "model.layers[0].param_bytes"),
        ("prompt_tokens: 256", "prompt_tokens: " + str(10**30), "workload.prompt_tokens"),
        ("batch_size: 1", "batch_size: " + str(10**30), "workload.batch_size"),
        ("max_stages: 2", "max_stages: " + str(10**30), "constraints.max_stages"),
        ("time_limit_s: 5", "time_limit_s: .inf", "solver.time_limit_s"),
    ],
)
def test_spec_numbers_must_be_finite_and_bounded(tmp_path, capsys, old, new, field):
    assert old in SPEC
    line = _one_line(capsys, _solve(tmp_path, SPEC.replace(old, new, 1)), field)
    assert "got" in line


@pytest.mark.parametrize(
    "text",
    [
        "[" * 10_000 + "]" * 10_000,
        "model: " + "{a: " * 10_000 + "1" + "}" * 10_000,
        json.dumps({"model": {}}).replace("{}", "[" * 10_000 + "]" * 10_000),
        "\n".join(" " * i + "a:" for i in range(2_000)),  # 10,000 would be 48 MiB
        "- " * 10_000 + "x",
        "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1),
    ],
    ids=["flow-seq", "flow-map", "json", "block-map", "compact-seq", "just-over"],
)
def test_deep_nesting_is_refused(tmp_path, capsys, text):
    _one_line(capsys, _solve(tmp_path, text), "spec.yaml", f"nested more than {MAX_DEPTH} levels")


def test_nesting_up_to_the_limit_parses():
    depth = MAX_DEPTH
    assert parse_document("[" * depth + "]" * depth, "x") is not None


def test_duplicate_keys_name_the_key_and_line(tmp_path, capsys):
    text = SPEC.replace("objective: latency", "objective: latency\nobjective: throughput")
    line = SPEC.splitlines().index("objective: latency") + 1
    _one_line(capsys, _solve(tmp_path, text), f"spec.yaml: line {line + 1}", "duplicate key 'objective'", f"line {line})")


def test_duplicate_keys_in_a_flow_mapping(tmp_path, capsys):
    text = SPEC.replace("{id: nas-cpu,", "{id: nas-cpu, id: nas2,")
    line = next(i for i, ln in enumerate(SPEC.splitlines(), 1) if "{id: nas-cpu," in ln)
    _one_line(capsys, _solve(tmp_path, text), f"line {line}: duplicate key 'id'")


def test_oversized_spec_is_refused_before_parsing(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    with path.open("w") as f:
        f.write(SPEC)
        f.write("#" * MAX_DOCUMENT_BYTES)
    _one_line(capsys, main(["solve", str(path)]), "big.yaml", "too large for a spec file", "at most 4 MiB")


def test_alias_bomb_is_refused():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 9):
        bomb += f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 10) + "]\n"
    with pytest.raises(SpecError, match="values once YAML aliases are expanded"):
        parse_document(bomb, "bomb.yaml")


def test_a_folder_is_not_a_spec(tmp_path, capsys):
    _one_line(capsys, main(["solve", str(tmp_path)]), "is a folder, not a spec file")


# ---- plans ---------------------------------------------------------------------------------------------


@pytest.fixture
def plan_dict(tmp_path, capsys) -> dict:
    path = tmp_path / "plan.json"
    assert main(["solve", str(ROOT / "specs" / "inline-pins.yaml"), "--out", str(path), "-f", "json"]) == 0
    capsys.readouterr()
    data = json.loads(path.read_text())
    assert len(data["stages"]) >= 2
    return data


def _plot(tmp_path: Path, data: dict | bytes) -> int:
    path = tmp_path / "bad-plan.json"
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return main(["plot", str(path), "--out", str(tmp_path / "p.png")])


def test_plan_not_utf8(tmp_path, capsys, plan_dict):
    raw = json.dumps(plan_dict).encode().replace(b'"name"', b'"n\xc3\x28ame"', 1)
    _one_line(capsys, _plot(tmp_path, raw), "bad-plan.json", "not valid UTF-8")


def test_plan_layers_contradicting_start_end(tmp_path, capsys, plan_dict):
    plan_dict["stages"][0]["layers"] = plan_dict["stages"][0]["layers"][:-1]
    _one_line(capsys, _plot(tmp_path, plan_dict), "stages[0].layers", "contradicts start/end")


def test_plan_stage_on_an_unknown_node(tmp_path, capsys, plan_dict):
    plan_dict["stages"][1]["node"] = "mystery-box"
    _one_line(capsys, _plot(tmp_path, plan_dict), "stages[1].node", "'mystery-box' is not in the plan's nodes")


def test_plan_ranges_with_a_gap(tmp_path, capsys, plan_dict):
    plan_dict["stages"][1]["start"] += 1
    plan_dict["stages"][1]["layers"] = plan_dict["stages"][1]["layers"][1:]
    _one_line(capsys, _plot(tmp_path, plan_dict), "stages[1]", "does not continue from unit")


def test_plan_link_to_an_unknown_node(tmp_path, capsys, plan_dict):
    plan_dict["links"][0]["b"] = "ghost"
    _one_line(capsys, _plot(tmp_path, plan_dict), "links[0]", "'ghost'")


@pytest.mark.parametrize(
    "path, value",
    [
        (("stages", 0, "compute_ms"), float("inf")),
        (("stages", 0, "start"), 10**30),
        (("nodes", 0, "compute_score"), float("nan")),
        (("nodes", 0, "memory_gb"), float("inf")),
        (("links", 0, "bandwidth_gbps"), float("inf")),
        (("workload", "prompt_tokens"), 10**30),
    ],
)
def test_plan_numbers_must_be_finite(tmp_path, capsys, plan_dict, path, value):
    target = plan_dict
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    text = json.dumps(plan_dict)  # writes Infinity / NaN, as json.dumps does
    field = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in path).replace(".[", "[")
    _one_line(capsys, _plot(tmp_path, text.encode()), field)


def test_plan_with_duplicate_keys(tmp_path, capsys, plan_dict):
    text = json.dumps(plan_dict, indent=1).replace('"objective":', '"objective": "latency",\n "objective":', 1)
    _one_line(capsys, _plot(tmp_path, text.encode()), "duplicate key 'objective'")


def test_yaml_plan_round_trip_still_loads(tmp_path, plan_dict):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan_dict, sort_keys=False))
    assert main(["plot", str(path), "--out", str(tmp_path / "ok.png")]) == 0
