"""The cluster registry (joins, heartbeats, deaths) and the spec its records make."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from noodle.serve.registry import ClusterRegistry, Heartbeat, JoinRequest, analytic_decode_ms, cluster_spec
from noodle.spec import parse_spec


def _join(node: str, decode_ms: float, free_gib: float = 4.0) -> JoinRequest:
    return JoinRequest.model_validate({
        "id": node, "address": f"127.0.0.1:{5000 + len(node)}", "model_hash": "abc",
        "device": {"kind": "cpu", "name": "x", "total_memory_bytes": 8 * 2**30, "free_memory_bytes": int(free_gib * 2**30),
                   "threads": 1},
        "costs": {"decode_ms": decode_ms, "prefill_ms_per_token": 0.1, "prompt_tokens": 32},
    })  # fmt: skip


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


def test_join_is_validated() -> None:
    with pytest.raises(ValidationError):
        JoinRequest.model_validate({**_join("a", 1.0).model_dump(), "address": "no-port"})
    with pytest.raises(ValidationError):
        JoinRequest.model_validate({**_join("a", 1.0).model_dump(), "costs": {"decode_ms": -1, "prefill_ms_per_token": 1,
                                                                             "prompt_tokens": 1}})  # fmt: skip


def test_spec_scores_follow_the_measurement_and_solve(model_dir: Path) -> None:
    reg = ClusterRegistry()
    ref = analytic_decode_ms(model_dir, 32)
    reg.join(_join("fast", ref / 4))
    reg.join(_join("slow", ref))
    data = cluster_spec(reg.records(), model_dir, concurrency=4)
    scores = {n["id"]: n["compute_score"] for n in data["cluster"]["nodes"]}
    assert scores["fast"] == pytest.approx(4.0, rel=1e-3) and scores["slow"] == pytest.approx(1.0, rel=1e-3)
    assert data["cluster"]["nodes"][0]["memory_gb"] == pytest.approx(4.0)
    spec = parse_spec(data, source="test")
    problem = spec.to_problem(model_dir, source="test")
    from noodle.solvers import solve

    result = solve(problem, solver="auto", time_limit_s=5)
    assert result.plan is not None


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
    before = cluster_spec(reg.records(), model_dir)["cluster"]["nodes"][0]["compute_score"]
    reg.scale("a", 2.0)
    after = cluster_spec(reg.records(), model_dir)["cluster"]["nodes"][0]["compute_score"]
    assert after == pytest.approx(before / 2, rel=1e-3)
