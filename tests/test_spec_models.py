"""Specs with ``models:`` (several models placed jointly): validation naming the field, and resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from noodle.errors import SpecError
from noodle.joint import JointProblem
from noodle.spec import load_joint_spec, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "specs" / "two-models-home-lab.yaml"


def _layers(n: int) -> list[dict]:
    return [{"name": f"u{i}", "latency_ms": 1.0, "param_bytes": 1000, "activation_bytes": 10} for i in range(n)]


def _doc(**over) -> dict:
    doc = {"models": [{"name": "a", "layers": _layers(3), "weight": 2},
                      {"name": "b", "layers": _layers(2), "workload": {"batch_size": 4}}],
           "cluster": {"nodes": [{"id": "x", "memory_gb": 1, "compute_score": 1},
                                 {"id": "y", "memory_gb": 1, "compute_score": 2}]}}
    doc.update(over)
    return doc


def test_models_resolve_to_a_joint_problem_with_their_own_workloads_and_shares():
    jp = parse_spec(_doc()).to_joint_problem()
    assert isinstance(jp, JointProblem) and [m.name for m in jp.models] == ["a", "b"]
    assert [m.weight for m in jp.models] == [2.0, 1.0] and not jp.required
    assert [m.problem.num_units for m in jp.models] == [3, 2]
    assert [m.problem.workload.batch_size for m in jp.models] == [1, 4]
    assert jp.models[0].problem.cluster == jp.models[1].problem.cluster


def test_the_example_spec_loads_jointly_and_single_model_specs_keep_their_meaning():
    spec, jp = load_joint_spec(EXAMPLE)
    assert isinstance(jp, JointProblem) and len(jp.models) == 2
    with pytest.raises(SpecError, match="models: 2 models are placed jointly"):
        load_spec(EXAMPLE)
    _, single = load_joint_spec(ROOT / "specs" / "gpt2-home-lab.yaml")
    assert single == load_spec(ROOT / "specs" / "gpt2-home-lab.yaml")[1]


@pytest.mark.parametrize("change, words", [
    ({"model": {"layers": _layers(2)}}, "give model (one model) or models (a list, placed jointly), not both"),
    ({"models": []}, "models: List should have at least 1 item"),
    ({"objective": "latency"}, "objective: models are placed for throughput"),
    ({"formats": ["int8"]}, "formats: weight formats are chosen for one model only"),
    ({"constraints": {"pins": [{"node": "x", "from": "u0"}]}}, "constraints.pins: pins name one model's units"),
])
def test_bad_models_specs_name_the_field(change, words):
    with pytest.raises(SpecError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(_doc(**change), "s.yaml")


def test_bad_model_entries_name_the_entry():
    doc = _doc()
    doc["models"][1] = {"name": "b", "layers": _layers(2), "weight": 1, "required_tokens_per_s": 5}
    with pytest.raises(SpecError, match="give weight \\(1\\) or required_tokens_per_s \\(5\\), not both"):
        parse_spec(doc, "s.yaml")
    doc["models"][1] = {"name": "b", "layers": _layers(2), "required_tokens_per_s": 5}
    with pytest.raises(SpecError, match=r"s.yaml: models\[0\]: give required_tokens_per_s as the other models do"):
        parse_spec(doc, "s.yaml").to_joint_problem(source="s.yaml")
    doc["models"][1] = {"name": "a", "layers": _layers(2)}
    with pytest.raises(SpecError, match=r"models\[1\].name: duplicate model name 'a'"):
        parse_spec(doc, "s.yaml").to_joint_problem(source="s.yaml")
    doc["models"][1] = {"name": "b", "layers": _layers(2), "workload": {"streams": 4}}
    with pytest.raises(SpecError, match=r"models\[1\].workload.streams: joint placement prices fixed groups"):
        parse_spec(doc, "s.yaml").to_joint_problem(source="s.yaml")
    doc["models"][1] = {"name": "b", "layers": [*_layers(2), *_layers(1)]}
    with pytest.raises(SpecError, match=r"models\[1\].layers: duplicate unit names u0"):
        parse_spec(doc, "s.yaml").to_joint_problem(source="s.yaml")


def test_a_node_profile_is_refused_with_models():
    doc = _doc()
    doc["cluster"]["nodes"][0] = {"id": "x", "memory_gb": 1, "profile": {"units": [{"name": "u0", "latency_ms": 1}]}}
    with pytest.raises(SpecError, match=r"cluster.nodes\[0\].profile: a node profile prices one model's units"):
        parse_spec(doc, "s.yaml")

