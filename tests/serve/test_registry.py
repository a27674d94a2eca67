"""The cluster registry (joins, heartbeats, deaths) and the spec its records make."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from noodle.serve.registry import ClusterRegistry, Heartbeat, JoinRequest, cluster_spec
from noodle.spec import parse_spec

NAMES = ("embed", "block.0", "block.1", "block.2", "block.3", "lm_head")  # the tiny GPT-2 of conftest


def _costs(unit_ms: float | list[float], names: tuple[str, ...] = NAMES, batches: tuple[int, ...] = (1,)) -> dict:
    ms = unit_ms if isinstance(unit_ms, list) else [unit_ms / len(names)] * len(names)
    return {"format": "noodle.unit-costs/1", "batch_size": batches[0], "prompt_tokens": 32, "dtype": "float32",
            "units": [{"name": n, "decode_ms": {str(b): m * b for b in batches}, "prefill_ms_per_token": m / 10,
                       "param_bytes": 200_000, "kv_bytes_per_token": 0 if n in ("embed", "lm_head") else 512}
                      for n, m in zip(names, ms)]}  # fmt: skip


def _body(node: str, decode_ms: float | list[float], free_gib: float = 4.0) -> dict:
    return {"id": node, "address": f"127.0.0.1:{5000 + len(node)}", "model_hash": "abc",
            "device": {"kind": "cpu", "name": "x", "total_memory_bytes": 8 * 2**30,
                       "free_memory_bytes": int(free_gib * 2**30), "threads": 1},
            "costs": _costs(decode_ms)}  # fmt: skip


def _join(node: str, decode_ms: float | list[float], free_gib: float = 4.0) -> JoinRequest:
    return JoinRequest.model_validate(_body(node, decode_ms, free_gib))


def test_heartbeats_keep_nodes_alive_and_silence_kills_them() -> None:
    reg = ClusterRegistry(heartbeat_timeout_s=0.3)
    reg.join(_join("a", 1.0))
    reg.join(_join("b", 1.0))
    v = reg.version
    time.sleep(0.2)
    assert reg.heartbeat(Heartbeat(id="a", load=0.5, free_memory_bytes=123))
    time.sleep(0.2)
    assert reg.reap() == ["b"] and reg.version == v + 1
    assert [r.id for r in reg.records(alive_only=True)] == ["a"]
    assert reg.records(alive_only=True)[0].free_memory_bytes == 123
    assert not reg.heartbeat(Heartbeat(id="b", free_memory_bytes=1))  # dead: must join again
    assert not reg.heartbeat(Heartbeat(id="zz", free_memory_bytes=1))
    reg.join(_join("b", 1.0))
    assert reg.alive_count() == 2


def test_join_keeps_the_unit_costs_as_the_node_profile() -> None:
    reg = ClusterRegistry()
    rec = reg.join(_join("a", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
    assert rec.profile.unit_names == NAMES and rec.profile.latency_ms == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    assert rec.decode_ms == pytest.approx(2.1)  # the whole model: the sum of its units, for display
    assert rec.profile.kv_bytes_per_token == (0, 512, 512, 512, 512, 0)
    d = rec.as_dict()
    assert d["units"] == 6 and "profile" not in d


def test_spec_carries_each_nodes_profile_and_solves(model_dir: Path) -> None:
    reg = ClusterRegistry()
    reg.join(_join("fast", 0.5))
    reg.join(_join("slow", [0.01, 1.0, 1.0, 1.0, 1.0, 0.01]))
    data = cluster_spec(reg.records(), model_dir, concurrency=4)
    nodes = {n["id"]: n for n in data["cluster"]["nodes"]}
    assert all("compute_score" not in n for n in nodes.values())
    assert [u["latency_ms"] for u in nodes["slow"]["profile"]["units"]] == [0.01, 1.0, 1.0, 1.0, 1.0, 0.01]
    assert nodes["fast"]["memory_gb"] == pytest.approx(4.0)
    spec = parse_spec(data, source="test")
    problem = spec.to_problem(model_dir, source="test")
    from noodle.graph.costmodel import cost_model_for, evaluate
    from noodle.graph.pernode import PerNodeCostModel
    from noodle.solvers import solve

    assert isinstance(cost_model_for(problem), PerNodeCostModel)
    result = solve(problem, solver="auto", time_limit_s=5)
    assert result.plan is not None
    ev = evaluate(problem, result.plan)
    slow = problem.cluster.node("slow")
    # the per-node table, not a score: the slow node's blocks cost what it measured
    assert PerNodeCostModel().stage_compute_ms(problem, slow, 1, 3) == pytest.approx(2.0)
    assert ev.bottleneck_ms > 0


def test_drift_needs_a_sustained_change_of_more_than_the_threshold() -> None:
    from types import SimpleNamespace as S

    from noodle.serve.drift import DriftWatch

    w = DriftWatch(threshold=0.15, sustain=3, min_steps=10)
    steps = 0

    def feed(ms: float, fresh: int = 10) -> list[tuple[int, float]]:
        nonlocal steps
        steps += fresh
        return w.observe([S(steps=steps, step_ms_p50=ms), S(steps=steps, step_ms_p50=2.0)])

    assert feed(1.0) == []  # baseline
    assert feed(1.1) == [] and feed(0.9) == []  # within 15 %
    assert feed(1.5) == [] and feed(1.5, fresh=3) == []  # too few fresh steps: not counted
    assert feed(1.0) == []  # back inside: strikes reset
    assert feed(1.5) == [] and feed(1.5) == []
    hit = feed(1.5)
    assert [i for i, _ in hit] == [0] and hit[0][1] == pytest.approx(1.5)
    assert feed(1.5) == []  # the new baseline is the drifted time


def test_drift_scales_the_node_in_the_spec(model_dir: Path) -> None:
    reg = ClusterRegistry()
    reg.join(_join("a", 1.0))
    before = cluster_spec(reg.records(), model_dir)["cluster"]["nodes"][0]["profile"]["units"]
    reg.scale("a", 2.0)
    after = cluster_spec(reg.records(), model_dir)["cluster"]["nodes"][0]["profile"]["units"]
    assert [u["latency_ms"] for u in after] == pytest.approx([2 * u["latency_ms"] for u in before])
