"""Bounded inputs: specs past noodle.sizes are refused with the field and the numbers, before any big allocation."""

from __future__ import annotations

import json

import pytest

from noodle import SpecError
from noodle.sizes import MAX_NODES, MAX_TABLE_CELLS, MAX_UNITS, size_problem
from noodle.solvers.tables import build_tables
from noodle.graph.costmodel import DefaultCostModel
from noodle.spec import parse_spec
from noodle.types import Cluster, Link, Node, Problem, Unit, Workload


def _layers(k: int) -> list[dict]:
    return [{"name": f"l{i}", "latency_ms": 1.0, "param_bytes": 1000, "activation_bytes": 100} for i in range(k)]


def _nodes(k: int) -> list[dict]:
    return [{"id": f"n{i}", "memory_gb": 8, "compute_score": 1.0} for i in range(k)]


def test_ten_thousand_nodes_are_refused_naming_the_field():
    spec = parse_spec({"model": {"layers": _layers(4)}, "cluster": {"nodes": _nodes(10_000)}}, "big.yaml")
    with pytest.raises(SpecError, match=rf"big.yaml: cluster.nodes: 10000 nodes, at most {MAX_NODES}"):
        spec.to_problem(source="big.yaml")


def test_too_many_layers_are_refused():
    spec = parse_spec({"model": {"layers": _layers(MAX_UNITS + 1)}, "cluster": {"nodes": _nodes(2)}}, "s.yaml")
    with pytest.raises(SpecError, match=rf"s.yaml: model.layers: {MAX_UNITS + 1} units, at most {MAX_UNITS}"):
        spec.to_problem(source="s.yaml")


def test_units_times_nodes_over_the_table_budget_is_refused():
    spec = parse_spec({"model": {"layers": _layers(1000)}, "cluster": {"nodes": _nodes(40)}}, "s.yaml")
    with pytest.raises(SpecError, match=r"1000 units x 40 nodes need 40,080,040 cost-table cells.*at most 16 nodes"):
        spec.to_problem(source="s.yaml")
    assert 17 * 1001**2 > MAX_TABLE_CELLS >= 16 * 1001**2


def test_limits_allow_the_benchmarked_sizes():
    assert size_problem(258, 128) is None and size_problem(98, 64) is None
    assert size_problem(MAX_UNITS, 15) is None and size_problem(254, MAX_NODES) is None
    assert size_problem(MAX_UNITS, 16) is not None


@pytest.mark.parametrize("key", ["n_layer", "num_hidden_layers"])
def test_hf_config_with_a_million_layers_is_refused_before_building(tmp_path, key):
    model_type = "gpt2" if key == "n_layer" else "llama"
    cfg = {"model_type": model_type, key: 1_000_000, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = parse_spec({"model": {"hf_config": "config.json"}, "cluster": {"nodes": _nodes(2)}}, "s.yaml")
    with pytest.raises(SpecError, match=r"s.yaml: model.hf_config: num_hidden_layers: 1000000 blocks, at most 1022"):
        spec.to_problem(tmp_path, source="s.yaml")


def test_build_tables_refuses_an_oversized_problem_built_in_code():
    nodes = tuple(Node(f"n{i}", "cpu", 8.0, 1.0) for i in range(MAX_NODES + 1))
    p = Problem((Unit("u0", 1.0, 10, 10),), Cluster(nodes, Link(1.0, 0.5)), Workload(8, 8, 1), "throughput")
    with pytest.raises(SpecError, match=rf"{MAX_NODES + 1} nodes, at most {MAX_NODES}"):
        build_tables(p, DefaultCostModel())
