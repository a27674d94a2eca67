"""Spec validation: every bad input names the file, the field and what is wrong."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from noodle import SpecError, load_spec
from noodle.spec import spec_json_schema

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "model": {
        "layers": [
            {"name": "embed", "latency_ms": 0.05, "param_bytes": 1000, "activation_bytes": 64},
            {"name": "block.0", "latency_ms": 1.0, "param_bytes": 1000, "activation_bytes": 64, "kv_bytes_per_token": 8},
            {"name": "lm_head", "latency_ms": 0.5, "param_bytes": 1000, "activation_bytes": 4},
        ]
    },
    "cluster": {
        "nodes": [
            {"id": "a", "device": "gpu", "memory_gb": 1, "compute_score": 2},
            {"id": "b", "device": "cpu", "memory_gb": 1, "compute_score": 1},
        ],
        "links": {"default": {"bandwidth_gbps": 1, "latency_ms": 0.5}, "pairs": []},
    },
}


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _mutate(fn):
    data = copy.deepcopy(BASE)
    fn(data)
    return data


def test_valid_spec_resolves_to_a_problem(tmp_path):
    spec, problem = load_spec(_write(tmp_path, BASE))
    assert spec.objective == "throughput" and spec.solver.name == "auto"
    assert [u.name for u in problem.units] == ["embed", "block.0", "lm_head"]
    assert problem.workload.context_tokens == 128 + 64


BAD = [
    (lambda d: d["cluster"]["nodes"][1].update(memory_gb=-1), r"cluster\.nodes\[1\]\.memory_gb: Input should be greater than 0"),
    (lambda d: d["cluster"]["nodes"][0].pop("compute_score"), r"cluster\.nodes\[0\]: node .a. needs compute_score .* or profile"),
    (lambda d: d["cluster"]["nodes"][0].update(speed=3), r"cluster\.nodes\[0\]\.speed: unknown key"),
    (lambda d: d.update(objective="cheapest"), r"objective: Input should be 'throughput' or 'latency'"),
    (lambda d: d["model"].update(profile="x.jsonl"), r"model: give exactly one of layers, profile, hf_config \(got layers, profile\)"),
    (lambda d: d["cluster"]["nodes"].append({"id": "a", "memory_gb": 1, "compute_score": 1}), r"cluster\.nodes\[2\]\.id: duplicate node id 'a'"),
    (lambda d: d["cluster"]["links"]["pairs"].append({"a": "a", "b": "zz", "bandwidth_gbps": 1, "latency_ms": 1}), r"cluster\.links\.pairs\[0\]\.b: unknown node 'zz'; nodes are a, b"),
    (lambda d: d.update(constraints={"exclude": ["q"]}), r"constraints\.exclude\[0\]: unknown node 'q'"),
    (lambda d: d.update(constraints={"exclude": ["a", "b"]}), r"constraints\.exclude: all 2 nodes are excluded"),
    (lambda d: d.update(constraints={"pins": [{"node": "a", "from": "block.9"}]}), r"constraints\.pins\[0\]\.from: unknown unit 'block.9'"),
    (lambda d: d.update(constraints={"pins": [{"node": "a", "from": "lm_head", "to": "embed"}]}), r"'to' \(embed\) comes before 'from' \(lm_head\)"),
    (lambda d: d.update(constraints={"pins": [{"node": "a", "from": "embed"}], "exclude": ["a"]}), r"pinned and excluded at once"),
    (lambda d: d.update(constraints={"max_stages": 0}), r"constraints\.max_stages: Input should be greater than or equal to 1"),
    (lambda d: d["model"]["layers"].append(dict(d["model"]["layers"][0])), r"model\.layers: duplicate unit names embed"),
    (lambda d: d.update(workload={"prompt_tokens": 0}), r"workload\.prompt_tokens: Input should be greater than or equal to 1"),
    (lambda d: d.update(workload={"streams": 0}), r"workload\.streams: Input should be greater than or equal to 1 \(got 0\)"),
    (lambda d: d.update(workload={"streams": 8, "batch_size": 4, "concurrency": 2}),
     r"workload: streams \(8\) sizes the batches itself: drop batch_size \(4\) and concurrency \(2\)"),
    (lambda d: d.update(workload={"streams": 8, "concurrency": 1}), r"workload: streams \(8\) .*drop concurrency \(1\)"),
]


@pytest.mark.parametrize("mutate, message", BAD)
def test_invalid_specs_name_file_field_and_problem(tmp_path, mutate, message):
    path = _write(tmp_path, _mutate(mutate))
    with pytest.raises(SpecError, match=message) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ncluster: [\n  nodes\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: line \d+: not valid YAML"):
        load_spec(path)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "nope.yaml")


def test_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match=r"\(top level\): expected a mapping"):
        load_spec(path)


def test_hf_config_path_is_relative_to_the_spec():
    spec, problem = load_spec(ROOT / "specs" / "gpt2-home-lab.yaml")
    assert problem.num_units == 14 and spec.model.hf_config == "models/gpt2-small.json"


def test_missing_hf_config_is_a_spec_error(tmp_path):
    data = _mutate(lambda d: d.update(model={"hf_config": "missing.json"}))
    with pytest.raises(SpecError, match=r"model\.hf_config: .*missing\.json"):
        load_spec(_write(tmp_path, data))


def test_published_schema_matches_the_models():
    committed = json.loads((ROOT / "specs" / "spec.schema.json").read_text())
    assert committed == spec_json_schema(), "regenerate: python -m noodle.spec > specs/spec.schema.json"


@pytest.mark.parametrize("name", ["gpt2-home-lab", "gpt2-profiled", "llama-70b-mixed", "infeasible", "inline-pins"])
def test_example_specs_validate_against_the_schema(name):
    jsonschema = pytest.importorskip("jsonschema")
    data = yaml.safe_load((ROOT / "specs" / f"{name}.yaml").read_text())
    jsonschema.validate(data, spec_json_schema())


def test_concurrency_multiplies_the_kv_cache_every_stage_holds(tmp_path):
    from noodle.graph.costmodel import DefaultCostModel, pipeline_tokens_per_s

    data = copy.deepcopy(BASE)
    data["workload"] = {"prompt_tokens": 64, "max_new_tokens": 32, "batch_size": 2}
    _, one = load_spec(_write(tmp_path, data))
    data["workload"]["concurrency"] = 4
    _, four = load_spec(_write(tmp_path, data))
    assert one.workload.concurrency == 1 and four.workload.sequences == 8
    node = one.cluster.nodes[0]
    kv = sum(u.kv_bytes_per_token for u in one.units[0:2]) * 96
    grown = DefaultCostModel().stage_memory_bytes(four, node, 0, 2) - DefaultCostModel().stage_memory_bytes(one, node, 0, 2)
    assert grown == kv * 2 * 3  # three more groups of two sequences each
    assert pipeline_tokens_per_s(30.0, 10.0, 2, 4) == pytest.approx(4 * 2 / 30.0 * 1e3)
    assert pipeline_tokens_per_s(30.0, 10.0, 5, 1) == pytest.approx(100.0)


def test_streams_is_continuous_batching_with_every_streams_kv_on_each_stage(tmp_path):
    from noodle.graph.costmodel import DefaultCostModel

    data = copy.deepcopy(BASE)
    data["workload"] = {"prompt_tokens": 64, "max_new_tokens": 32, "streams": 6}
    _, p = load_spec(_write(tmp_path, data))
    w = p.workload
    assert w.batched and w.sequences == 6 and (w.batch_size, w.concurrency) == (1, 1)
    assert [(w.groups(s), w.step_batch(s)) for s in (1, 2, 4, 6, 9)] == [(1, 6), (2, 3), (4, 2), (6, 1), (6, 1)]
    assert w.at_stages(4).batch_size == 2 and w.at_stages(4).sequences == 6
    kv = sum(u.kv_bytes_per_token for u in p.units[0:2]) * 96 * 6
    params = sum(u.param_bytes for u in p.units[0:2])
    assert DefaultCostModel().stage_memory_bytes(p, p.cluster.nodes[0], 0, 2) == params + kv
    data["workload"] = {"prompt_tokens": 64, "max_new_tokens": 32, "batch_size": 2, "concurrency": 3}
    _, old = load_spec(_write(tmp_path, data))
    assert not old.workload.batched and old.workload.step_batch(4) == 2 and old.workload.groups(4) == 3
