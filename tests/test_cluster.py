"""noodle.cluster: measured node records -> a spec that loads and solves, with the measured numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from noodle import SpecError, load_spec, solve
from noodle.cluster import LinkMeasurement, NodeRecord, export_spec
from noodle.profile.pernode import PerNodeCostModel
from noodle.types import GIB, NodeProfile, Workload

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("embed", "block.0", "block.1", "block.2", "lm_head")
LAYERS = [{"name": n, "latency_ms": ms, "param_bytes": 50_000_000, "activation_bytes": 3072,
           "kv_bytes_per_token": 0 if n in ("embed", "lm_head") else 6144}
          for n, ms in zip(NAMES, (0.05, 1.1, 1.1, 1.1, 2.0))]
MODEL = {"layers": LAYERS}
WORKLOAD = Workload(prompt_tokens=128, max_new_tokens=32, batch_size=1, concurrency=2)


def _records() -> list[NodeRecord]:
    gpu = NodeProfile(NAMES, (0.02, 0.11, 0.12, 0.11, 0.9), batch_size=1,
                      decode_ms=((4, (0.03, 0.15, 0.16, 0.15, 1.2)),), param_bytes=(50_000_000,) * 5,
                      kv_bytes_per_token=(0, 6144, 6144, 6144, 0), prefill_ms_per_token=(0.001, 0.01, 0.01, 0.01, 0.05))
    igpu = NodeProfile(NAMES, (0.03, 0.45, 0.45, 0.46, 0.6))
    return [
        NodeRecord("gpu-box", "10.0.0.2:50051", "cuda", "NVIDIA GeForce RTX 3060", 12 * GIB, 10 * GIB + 123_456, 8,
                   costs=gpu, links=(LinkMeasurement("laptop", 9.5, 0.06), LinkMeasurement("gone", 100.0, 0.01))),
        NodeRecord("laptop", "10.0.0.3:50051", "xpu", "Iris Xe", 16 * GIB, None, 4, costs=igpu,
                   links=(LinkMeasurement("gpu-box", 8.0, 0.05), LinkMeasurement("nas", 0.9, 0.7))),
        NodeRecord("nas", None, "cpu", "", 32 * GIB, 20 * GIB, 2, compute_score=0.5),
    ]


def test_export_writes_the_measured_numbers():
    doc = export_spec(_records(), MODEL, WORKLOAD, name="home")
    gpu, laptop, nas = doc["cluster"]["nodes"]
    assert gpu["memory_gb"] == 10.0 and laptop["memory_gb"] == 16.0  # free memory (whole MiB), else the total
    assert gpu["address"] == "10.0.0.2:50051" and "address" not in nas and "compute_score" not in gpu
    assert nas["compute_score"] == 0.5 and "profile" not in nas
    prof = gpu["profile"]
    assert prof["batch_size"] == 1 and prof["source"] == "NVIDIA GeForce RTX 3060, 8 torch threads"
    assert [u["latency_ms"] for u in prof["units"]] == [0.02, 0.11, 0.12, 0.11, 0.9]
    assert prof["units"][4] == {"name": "lm_head", "latency_ms": 0.9, "decode_ms": {4: 1.2}, "param_bytes": 50_000_000,
                                "kv_bytes_per_token": 0, "prefill_ms_per_token": 0.05}
    assert laptop["profile"]["units"][1] == {"name": "block.0", "latency_ms": 0.45}
    links = doc["cluster"]["links"]
    # measured from both ends: the slower figures; a departed peer is left out
    assert links["pairs"] == [{"a": "gpu-box", "b": "laptop", "bandwidth_gbps": 8.0, "latency_ms": 0.06},
                              {"a": "laptop", "b": "nas", "bandwidth_gbps": 0.9, "latency_ms": 0.7}]
    assert links["default"] == {"bandwidth_gbps": 0.9, "latency_ms": 0.7}  # gpu-box <-> nas: nobody measured it
    assert doc["workload"] == {"prompt_tokens": 128, "max_new_tokens": 32, "batch_size": 1, "concurrency": 2}


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_round_trip_export_load_solve(tmp_path, fmt):
    records = _records()
    doc = export_spec(records, MODEL, WORKLOAD, objective="latency")
    path = tmp_path / f"cluster.{fmt}"
    path.write_text(yaml.safe_dump(doc, sort_keys=False) if fmt == "yaml" else json.dumps(doc))
    _, problem = load_spec(path)
    by_id = {n.id: n for n in problem.cluster.nodes}
    for r in records:
        if isinstance(r.costs, NodeProfile):  # the numbers come back exactly (the source note aside)
            got = by_id[r.id].profile
            assert (got.latency_ms, got.decode_ms, got.batch_size) == (r.costs.latency_ms, r.costs.decode_ms, 1)
            assert got.param_bytes == (r.costs.param_bytes or got.param_bytes)
        else:
            assert by_id[r.id].profile is None and by_id[r.id].compute_score == r.compute_score
    assert problem.cluster.link("gpu-box", "laptop").bandwidth_gbps == 8.0
    result = solve(problem, solver="auto", time_limit_s=5)
    assert result.status == "optimal"
    cm = PerNodeCostModel()
    gpu = by_id["gpu-box"]
    assert cm.stage_compute_ms(problem, gpu, 0, 5) == pytest.approx(sum(records[0].costs.latency_ms))


def test_round_trip_with_an_hf_config_model_and_a_profile_path(tmp_path):
    pytest.importorskip("transformers")
    config = str(ROOT / "specs" / "models" / "gpt2-small.json")
    _, analytic = load_spec(ROOT / "specs" / "gpt2-home-lab.yaml")
    names = tuple(u.name for u in analytic.units)
    prof = NodeProfile(names, tuple(0.5 * u.latency_ms for u in analytic.units))
    units_dir = tmp_path / "runs" / "laptop"
    units_dir.mkdir(parents=True)
    (units_dir / "units.json").write_text(json.dumps({
        "format": "noodle.units/1", "reference_device": {"host": "laptop"}, "workload": {"batch_size": 1},
        "units": [{"name": u.name, "latency_ms": 2 * u.latency_ms, "param_bytes": u.param_bytes,
                   "activation_bytes": u.activation_bytes, "kv_bytes_per_token": u.kv_bytes_per_token}
                  for u in analytic.units]}))
    records = [NodeRecord("gpu", None, "cuda", total_memory_bytes=8 * GIB, costs=prof),
               NodeRecord("laptop", None, "cpu", total_memory_bytes=8 * GIB, costs="runs/laptop")]
    doc = export_spec(records, config, {"prompt_tokens": 64, "max_new_tokens": 16, "batch_size": 1})
    assert doc["model"] == {"hf_config": config} and doc["cluster"]["nodes"][1]["profile"] == "runs/laptop"
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    _, problem = load_spec(path)
    assert all(n.profile is not None for n in problem.cluster.nodes)
    assert solve(problem, solver="auto", time_limit_s=5).plan is not None


@pytest.mark.parametrize("records, message", [
    ([], r"no nodes have joined"),
    ([NodeRecord("a", None, "cpu", total_memory_bytes=GIB, compute_score=1.0)] * 2, r"node 'a' is listed twice"),
    ([NodeRecord("a", None, "cpu", total_memory_bytes=GIB)], r"node 'a': no measured unit costs and no compute_score"),
    ([NodeRecord("a", None, "cpu", total_memory_bytes=GIB, free_memory_bytes=1000, compute_score=1.0)],
     r"node 'a': reports 1000 bytes of memory"),
    ([NodeRecord("a", None, "cpu", total_memory_bytes=GIB, compute_score=1.0,
                 links=(LinkMeasurement("b", -1.0, 0.1),)),
      NodeRecord("b", None, "cpu", total_memory_bytes=GIB, compute_score=1.0)],
     r"noodle cluster export: cluster\.links\.(default|pairs\[0\])\.bandwidth_gbps: .*got -1\.0"),
])
def test_bad_records_are_refused_with_the_reason(records, message):
    with pytest.raises(SpecError, match=message):
        export_spec(records, MODEL, WORKLOAD)


def test_export_writes_the_step_overhead_and_solve_uses_it(tmp_path):
    import dataclasses

    recs = _records()
    recs[0] = dataclasses.replace(recs[0], costs=dataclasses.replace(recs[0].costs, step_overhead_ms=0.4,
                                                                     prefill_overhead_ms=2.0))
    doc = export_spec(recs, MODEL, WORKLOAD)
    gpu, laptop, _ = doc["cluster"]["nodes"]
    assert gpu["profile"]["step_overhead_ms"] == 0.4 and gpu["profile"]["prefill_overhead_ms"] == 2.0
    assert "step_overhead_ms" not in laptop["profile"]  # not measured: nothing written, 0 when loaded
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    _, problem = load_spec(path)
    node = problem.cluster.node("gpu-box")
    assert node.profile.step_overhead_ms == 0.4
    assert PerNodeCostModel().stage_compute_ms(problem, node, 1, 3) == pytest.approx(0.11 + 0.12 + 0.4)
    assert solve(problem, time_limit_s=10).plan is not None


def test_unmeasured_cluster_gets_the_spec_default_link():
    records = [NodeRecord(i, None, "cpu", total_memory_bytes=GIB, compute_score=1.0) for i in ("a", "b")]
    links = export_spec(records, MODEL, WORKLOAD)["cluster"]["links"]
    assert links == {"default": {"bandwidth_gbps": 1.0, "latency_ms": 0.5}, "pairs": []}
