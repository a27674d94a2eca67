"""The default cost model against hand-computed values, the cost graph, custom cost models."""

from __future__ import annotations

import pytest

from noodle import DefaultCostModel, evaluate, solve
from noodle.graph.build import build_cost_graph, problem_from_graph
from noodle.types import GIB, Cluster, Link, Node, Plan, Problem, Unit, Workload


def _problem(objective: str = "throughput") -> Problem:
    units = (
        Unit("embed", 0.5, 100, 1000, 0),
        Unit("block.0", 2.0, 200, 1000, 10),
        Unit("block.1", 2.0, 200, 1000, 10),
        Unit("lm_head", 1.0, 100, 8, 0),
    )
    nodes = (Node("gpu", "gpu", 1.0, 4.0), Node("cpu", "cpu", 1.0, 1.0))
    cluster = Cluster(nodes, Link(1.0, 0.5), (("gpu", "cpu", Link(8.0, 0.1)),))
    return Problem(units, cluster, Workload(10, 6, 2), objective)


def test_default_cost_model_by_hand():
    p = _problem()
    plan = Plan.from_cuts(["cpu", "gpu"], [0, 2, 4])
    ev = evaluate(p, plan)
    c0 = (0.5 + 2.0) / 1.0
    c1 = (2.0 + 1.0) / 4.0
    hop = 0.1 + 1000 * 8 / (8.0 * 1e9) * 1e3  # activation of block.0 over the gpu-cpu link
    ret = 0.1
    assert ev.stages[0].compute_ms == pytest.approx(c0)
    assert ev.stages[1].compute_ms == pytest.approx(c1)
    assert ev.stages[0].out_ms == pytest.approx(hop)
    assert ev.stages[1].out_ms == pytest.approx(ret)
    assert ev.token_latency_ms == pytest.approx(c0 + c1 + hop + ret)
    assert ev.bottleneck_ms == pytest.approx(max(c0 + hop, c1 + ret))
    # memory: params + kv * (prompt + new) * batch
    assert ev.stages[0].memory_bytes == 100 + 200 + 10 * 16 * 2
    assert ev.stages[1].memory_bytes == 200 + 100 + 10 * 16 * 2


def test_single_stage_has_no_return_hop():
    p = _problem("latency")
    ev = evaluate(p, Plan.from_cuts(["gpu"], [0, 4]))
    assert ev.token_latency_ms == pytest.approx(5.5 / 4.0)
    assert ev.stages[0].out_ms == 0.0


def test_cost_graph_round_trip():
    p = _problem()
    g = build_cost_graph(p.units, p.cluster, p.workload)
    assert g.number_of_nodes() == 4 + 2
    assert g.edges[("unit", 0), ("unit", 1)]["bytes"] == 1000
    assert g.edges[("node", "gpu"), ("node", "cpu")]["bandwidth_gbps"] == 8.0
    back = problem_from_graph(g, objective="throughput")
    assert back.units == p.units
    assert back.cluster.link("cpu", "gpu") == Link(8.0, 0.1)
    assert back.cluster.link("gpu", "gpu") == p.cluster.default_link
    assert [n.id for n in back.cluster.nodes] == ["gpu", "cpu"]


class CommunicationHeavy(DefaultCostModel):
    """A custom model: every hop costs 50 ms, so splitting never pays."""

    name = "comm-heavy"

    def hop_ms(self, problem, src, dst, cut):
        return 50.0

    def return_ms(self, problem, last, first):
        return 50.0


def test_custom_cost_model_changes_the_plan():
    units = tuple(Unit(f"block.{i}", 4.0, GIB // 8, 4096) for i in range(6))
    nodes = (Node("a", "gpu", 8.0, 2.0), Node("b", "gpu", 8.0, 2.0), Node("c", "cpu", 8.0, 1.0))
    p = Problem(units, Cluster(nodes, Link(10.0, 0.05)), Workload(8, 8, 1), "throughput")
    default = solve(p, solver="cpsat")
    custom = solve(p, solver="cpsat", cost_model=CommunicationHeavy())
    assert len(default.plan.stages) > 1
    assert len(custom.plan.stages) == 1
    assert custom.objective_ms == pytest.approx(24.0 / 2.0)
    assert custom.objective_ms == pytest.approx(evaluate(p, custom.plan, CommunicationHeavy()).objective_ms)
