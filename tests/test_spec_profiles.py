"""Spec nodes with their own measured profile (a path or inline): loading, checks, and the model they select."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from noodle import SpecError, load_spec, plan_document, solve
from noodle.graph.costmodel import DefaultCostModel, evaluate
from noodle.profile.pernode import PerNodeCostModel
from noodle.spec import spec_json_schema
from tests.test_spec import BASE

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["embed", "block.0", "lm_head"]


def _units_json(path: Path, latency, *, batch_size: int = 2, names=NAMES, param_bytes: int = 500) -> Path:
    """A units.json as `noodle profile` writes it (format noodle.units/1)."""
    doc = {
        "format": "noodle.units/1", "model": "tiny", "latency_stat": "p50",
        "reference_device": {"host": "gpu-box", "device": "cuda"},
        "workload": {"prompt_tokens": 8, "decode_tokens": 4, "batch_size": batch_size},
        "units": [{"name": n, "latency_ms": ms, "prefill_ms_per_token": ms / 4, "param_bytes": param_bytes,
                   "activation_bytes": 64, "kv_bytes_per_token": 8} for n, ms in zip(names, latency)],
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "units.json").write_text(json.dumps(doc))
    return path


def _spec(tmp_path: Path, nodes) -> Path:
    data = copy.deepcopy(BASE)
    data["cluster"]["nodes"] = nodes
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


INLINE = {"batch_size": 1, "source": "laptop iGPU",
          "units": [{"name": "embed", "latency_ms": 0.04, "decode_ms": {4: 0.05}},
                    {"name": "block.0", "latency_ms": 0.9, "decode_ms": {4: 1.5}},
                    {"name": "lm_head", "latency_ms": 0.1, "decode_ms": {4: 0.15}, "param_bytes": 400}]}


def test_path_inline_and_plain_nodes_mix(tmp_path):
    _units_json(tmp_path / "runs" / "gpu-box", [0.01, 0.05, 0.3])
    path = _spec(tmp_path, [
        {"id": "gpu-box", "device": "cuda", "memory_gb": 1, "profile": "runs/gpu-box"},
        {"id": "laptop", "device": "igpu", "memory_gb": 1, "profile": INLINE},
        {"id": "nas", "device": "cpu", "memory_gb": 1, "compute_score": 1.0},
    ])
    _, problem = load_spec(path)
    gpu, laptop, nas = problem.cluster.nodes
    assert gpu.profile.latency_ms == (0.01, 0.05, 0.3) and gpu.profile.batch_size == 2
    assert gpu.profile.param_bytes == (500, 500, 500) and gpu.profile.source.endswith("units.json")
    assert gpu.profile.prefill_ms_per_token == pytest.approx((0.0025, 0.0125, 0.075))
    assert laptop.profile.decode_ms == ((4, (0.05, 1.5, 0.15)),) and laptop.profile.source == "laptop iGPU"
    assert laptop.profile.param_bytes == (1000, 1000, 400)  # the model's where the node gives none
    assert laptop.profile.kv_bytes_per_token is None and nas.profile is None
    # no compute_score given: the model's total decode time over the node's own
    assert gpu.compute_score == pytest.approx(1.55 / 0.36) and laptop.compute_score == pytest.approx(1.55 / 1.04)
    result = solve(problem, solver="auto", time_limit_s=5)
    doc = plan_document(problem, result)
    assert doc.cost_model == "per-node"
    ev = evaluate(problem, result.plan, PerNodeCostModel())
    assert result.objective_ms == doc.objective_ms == ev.objective_ms
    assert any("its own measured profile" in s.rationale for s in doc.stages)


def test_a_compute_score_beside_a_profile_serves_the_default_model_only(tmp_path):
    path = _spec(tmp_path, [{"id": "a", "memory_gb": 1, "compute_score": 3.0, "profile": INLINE},
                            {"id": "b", "memory_gb": 1, "compute_score": 1.0}])
    _, problem = load_spec(path)
    a = problem.cluster.nodes[0]
    assert a.compute_score == 3.0
    assert PerNodeCostModel().stage_compute_ms(problem, a, 0, 3) == pytest.approx(1.04)
    assert DefaultCostModel().stage_compute_ms(problem, a, 0, 3) == pytest.approx(1.55 / 3.0)


def test_batch_size_of_the_workload_picks_the_measured_decode(tmp_path):
    data = copy.deepcopy(BASE)
    data["workload"] = {"batch_size": 4}
    data["cluster"]["nodes"] = [{"id": "a", "memory_gb": 1, "profile": INLINE}]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    _, problem = load_spec(path)
    assert PerNodeCostModel().stage_compute_ms(problem, problem.cluster.nodes[0], 0, 3) == pytest.approx(1.70)


def test_an_inline_step_overhead_is_paid_by_the_nodes_stage(tmp_path):
    node = {"id": "a", "memory_gb": 1, "profile": {**INLINE, "step_overhead_ms": 0.25, "prefill_overhead_ms": 1.5}}
    _, problem = load_spec(_spec(tmp_path, [node]))
    a = problem.cluster.nodes[0]
    assert a.profile.step_overhead_ms == 0.25 and a.profile.prefill_overhead_ms == 1.5
    assert PerNodeCostModel().stage_compute_ms(problem, a, 0, 3) == pytest.approx(0.04 + 0.9 + 0.1 + 0.25)
    assert PerNodeCostModel().stage_compute_ms(problem, a, 1, 2) == pytest.approx(0.9 + 0.25)


def _bad_inline(**unit_changes):
    prof = copy.deepcopy(INLINE)
    for i, change in unit_changes.items():
        prof["units"][int(i[1:])].update(change)
    return prof


@pytest.mark.parametrize("node, message", [
    ({"id": "a", "memory_gb": 1},
     r"spec\.yaml: cluster\.nodes\[0\]: node 'a' needs compute_score \(its speed relative to the reference device\) "
     r"or profile"),
    ({"id": "a", "memory_gb": 1, "profile": _bad_inline(u1={"name": "block.1"})},
     r"cluster\.nodes\[0\]\.profile\.units: unit 1 is 'block\.1' in the node's profile but 'block\.0' in the model"),
    ({"id": "a", "memory_gb": 1, "profile": {"units": INLINE["units"][:2]}},
     r"cluster\.nodes\[0\]\.profile\.units: 2 units in the node's profile, 3 in the model: "
     r"the model's unit 2 'lm_head' is missing"),
    ({"id": "a", "memory_gb": 1, "profile": _bad_inline(u2={"decode_ms": {8: 0.2}})},
     r"cluster\.nodes\[0\]\.profile\.units\[2\]\.decode_ms: batch sizes \[8\] differ from units\[0\]'s \[4\]"),
    ({"id": "a", "memory_gb": 1, "profile": _bad_inline(u1={"latency_ms": -1})},
     r"cluster\.nodes\[0\]\.profile\.inline\.units\[1\]\.latency_ms: .*greater than or equal to 0"),
    ({"id": "a", "memory_gb": 1, "profile": {**INLINE, "step_overhead_ms": -0.5}},
     r"cluster\.nodes\[0\]\.profile\.inline\.step_overhead_ms: .*greater than or equal to 0"),
    ({"id": "a", "memory_gb": 1, "profile": {**INLINE, "step_overhead_ms": "fast"}},
     r"cluster\.nodes\[0\]\.profile\.inline\.step_overhead_ms: "),
    ({"id": "a", "memory_gb": 1, "profile": 5},
     r"cluster\.nodes\[0\]\.profile: expected a profile path \(folder, units\.json or metrics\.jsonl\) "
     r"or an inline profile"),
    ({"id": "a", "memory_gb": 1, "profile": "runs/missing"},
     r"cluster\.nodes\[0\]\.profile: .*runs/missing: no such profile file"),
])
def test_bad_node_profiles_name_the_field(tmp_path, node, message):
    with pytest.raises(SpecError, match=message):
        load_spec(_spec(tmp_path, [node, {"id": "b", "memory_gb": 1, "compute_score": 1.0}]))


def test_a_profile_of_another_model_names_the_first_differing_unit(tmp_path):
    _units_json(tmp_path / "other", [0.1, 0.1, 0.1, 0.1], names=["embed", "block.0", "block.1", "lm_head"])
    path = _spec(tmp_path, [{"id": "a", "memory_gb": 1, "profile": "other"}])
    with pytest.raises(SpecError, match=r"cluster\.nodes\[0\]\.profile: unit 2 is 'block\.1' in the node's profile "
                                        r"but 'lm_head' in the model; profile the same model on 'a'"):
        load_spec(path)


def test_per_node_example_spec_solves_and_validates_against_the_schema():
    spec, problem = load_spec(ROOT / "specs" / "per-node-profiles.yaml")
    assert sum(n.profile is not None for n in problem.cluster.nodes) == 2
    result = solve(problem, solver=spec.solver.name, time_limit_s=spec.solver.time_limit_s)
    assert result.status == "optimal"
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(yaml.safe_load((ROOT / "specs" / "per-node-profiles.yaml").read_text()), spec_json_schema())
