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
    return {"id": node, "address": f"127.0.0.1:{5000 + len(node)}", "model_hash": "abc", "weights_sha256": "0" * 64,
            "device": {"kind": "cpu", "name": "x", "total_memory_bytes": 8 * 2**30,
                       "free_memory_bytes": int(free_gib * 2**30), "threads": 1},
            "costs": _costs(decode_ms)}  # fmt: skip


def _join(node: str, decode_ms: float | list[float], free_gib: float = 4.0) -> JoinRequest:
    return JoinRequest.model_validate(_body(node, decode_ms, free_gib))


def test_heartbeats_keep_nodes_alive_and_silence_kills_them() -> None:
    reg = ClusterRegistry(heartbeat_timeout_s=0.3)
    a = reg.join(_join("a", 1.0)).secret
    b = reg.join(_join("b", 1.0)).secret
    v = reg.version
    time.sleep(0.2)
    assert reg.heartbeat(Heartbeat(id="a", load=0.5, free_memory_bytes=123, secret=a))
    time.sleep(0.2)
    assert reg.reap() == ["b"] and reg.version == v + 1
    assert [r.id for r in reg.records(alive_only=True)] == ["a"]
    assert reg.records(alive_only=True)[0].free_memory_bytes == 123
    assert not reg.heartbeat(Heartbeat(id="b", free_memory_bytes=1, secret=b))  # dead: must join again
    assert not reg.heartbeat(Heartbeat(id="zz", free_memory_bytes=1))
    reg.join(_join("b", 1.0))
    assert reg.alive_count() == 2


def test_a_node_that_leaves_is_out_at_once_and_its_name_is_free() -> None:
    from noodle.serve.claims import ClaimRefused

    reg = ClusterRegistry(heartbeat_timeout_s=60)
    a = reg.join(_join("a", 1.0)).secret
    b = reg.join(_join("b", 1.0)).secret
    reg.take_changes()
    with pytest.raises(ClaimRefused, match="secret: not the secret node 'a' was given"):
        reg.leave("a", b)
    v = reg.version
    assert reg.leave("a", a) and reg.version == v + 1 and reg.take_changes() == ["a left"]
    assert [r.id for r in reg.records(alive_only=True)] == ["b"]
    assert not reg.leave("a", a) and not reg.leave("zz", "") and reg.version == v + 1
    assert not reg.heartbeat(Heartbeat(id="a", free_memory_bytes=1, secret=a))  # it must join again
    reg.join(_join("a", 1.0))  # long before its heartbeat timeout
    assert reg.alive_count() == 2


def test_a_heartbeat_speaks_only_for_its_own_node_and_a_live_name_is_not_taken_over() -> None:
    from noodle.serve.claims import ClaimRefused

    reg = ClusterRegistry(heartbeat_timeout_s=0.3)
    a, b = reg.join(_join("a", 1.0)).secret, reg.join(_join("b", 1.0)).secret
    assert a != b and len(a) >= 32
    with pytest.raises(ClaimRefused, match="secret: not the secret node 'a' was given") as refused:
        reg.heartbeat(Heartbeat(id="a", free_memory_bytes=10**12, secret=b))  # b's secret does not speak for a
    assert refused.value.status == 403
    with pytest.raises(ClaimRefused) as refused:
        reg.heartbeat(Heartbeat(id="a", free_memory_bytes=10**12))
    assert refused.value.status == 403
    with pytest.raises(ClaimRefused, match=r"free_memory_bytes: 9663676416 free is more than the node's total") as big:
        reg.heartbeat(Heartbeat(id="a", free_memory_bytes=9 * 2**30, secret=a))
    assert big.value.status == 400
    assert reg.records()[0].free_memory_bytes == 4 * 2**30  # nothing of it was kept
    with pytest.raises(ClaimRefused, match="a live node is named 'a'") as dup:
        reg.join(_join("a", 0.5))
    assert dup.value.status == 409 and dup.value.code == "name_in_use"
    assert reg.heartbeat(Heartbeat(id="a", free_memory_bytes=1, secret=a))  # the first one keeps its record
    time.sleep(0.4)  # silent past the timeout: the name is free again, even before the controller reaps it
    c = reg.join(_join("a", 0.5)).secret
    with pytest.raises(ClaimRefused):
        reg.heartbeat(Heartbeat(id="a", free_memory_bytes=1, secret=a))  # the old one's heartbeats no longer count
    assert reg.heartbeat(Heartbeat(id="a", free_memory_bytes=1, secret=c))


def test_the_node_count_is_bounded_at_join() -> None:
    from noodle.serve.claims import ClaimRefused
    from noodle.sizes import MAX_NODES

    reg = ClusterRegistry(heartbeat_timeout_s=3600)
    for i in range(MAX_NODES):
        reg.join(_join(f"n{i}", 1.0))
    with pytest.raises(ClaimRefused, match=f"{MAX_NODES} live nodes and this one make {MAX_NODES + 1} nodes, "
                                           f"at most {MAX_NODES}") as refused:
        reg.join(_join("one-more", 1.0))
    assert refused.value.status == 400


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
    from noodle.profile.pernode import PerNodeCostModel
    from noodle.solvers import solve

    assert isinstance(cost_model_for(problem), PerNodeCostModel)
    result = solve(problem, solver="auto", time_limit_s=5)
    assert result.plan is not None
    ev = evaluate(problem, result.plan)
    slow = problem.cluster.node("slow")
    # the per-node table, not a score: the slow node's blocks cost what it measured
    assert PerNodeCostModel().stage_compute_ms(problem, slow, 1, 3) == pytest.approx(2.0)
    assert ev.bottleneck_ms > 0


def test_ewma_and_fresh_windows() -> None:
    from noodle.serve.drift import ewma, fresh_window

    assert ewma(None, 2.0, 0.3) == 2.0
    assert ewma(2.0, 1.0, 0.3) == pytest.approx(1.7)
    x = None
    for _ in range(30):
        x = ewma(x, 1.25, 0.3)
    assert x == pytest.approx(1.25)
    assert fresh_window([1.0, 2.0, 3.0], total=3, seen=0, min_steps=4) is None
    assert fresh_window([1.0, 2.0, 3.0, 4.0], total=10, seen=8, min_steps=2) == [3.0, 4.0]
    assert fresh_window([5.0, 6.0], total=100, seen=0, min_steps=2) == [5.0, 6.0]  # only the recent ones are kept


def test_prediction_watch_feeds_factors_and_needs_a_sustained_error() -> None:
    from noodle.serve.drift import PredictionWatch, StageWindow

    w = PredictionWatch(threshold=0.15, sustain=3, alpha=0.5)
    factors: dict = {}

    def feed(measured: float, predicted: float = 1.0, table: float = 1.0) -> list:
        updates, drifted = w.observe([StageWindow(0, "a", 0, 3, measured, predicted, table),
                                      StageWindow(1, "b", 3, 6, 2.0, 2.0, 2.0)], factors)  # fmt: skip
        factors.update(updates)
        return drifted

    assert feed(1.1) == [] and factors[("a", 0, 3)] == pytest.approx(1.1)  # first window: the ratio itself
    assert w.errors[0].error == pytest.approx(0.1) and w.errors[0].corrected_error == pytest.approx(0.1)
    assert feed(1.3) == [] and factors[("a", 0, 3)] == pytest.approx(1.2)  # EWMA
    assert w.errors[0].corrected_error == pytest.approx(1.3 / 1.1 - 1)  # vs the estimate before this window
    assert w.errors[0].corrected_ms == pytest.approx(1.2)
    assert feed(1.3) == [] and feed(1.0) == []  # two strikes, then back inside: strikes reset
    assert feed(1.5) == [] and feed(1.5) == []
    hit = feed(1.5)
    assert [e.index for e in hit] == [0] and hit[0].error == pytest.approx(0.5) and hit[0].windows == 7
    assert factors[("b", 3, 6)] == pytest.approx(1.0) and w.errors[1].error == 0.0
    # against the corrected prediction the same measurement is no error
    assert feed(1.5, predicted=1.5) == [] and w.errors[0].error == pytest.approx(0.0)
    w.reset()
    assert w.errors == {}


def test_corrections_scale_their_ranges_and_the_rest_of_the_node() -> None:
    from noodle.serve.registry import corrected, table_ms

    reg = ClusterRegistry()
    reg.join(_join("a", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    reg.correct("a", 1, 3, 2.0)
    reg.correct("a", 0, 1, 0.5)
    reg.correct("a", 1, 3, 1.5)  # replaces the earlier [1, 3) and becomes the most recent
    rec = reg.records()[0]
    assert rec.corrections == ((0, 1, 0.5), (1, 3, 1.5)) and rec.correction == 1.5
    prof = corrected(rec.profile, rec.corrections)
    assert prof.latency_ms == pytest.approx((0.5, 3.0, 4.5, 6.0, 7.5, 9.0))  # others: the latest factor
    assert prof.prefill_ms_per_token == pytest.approx(tuple(x / 10 for x in prof.latency_ms))
    assert table_ms(rec, 1, 3) == pytest.approx(5.0)  # the join-time figure, uncorrected
    assert corrected(rec.profile, ()) is rec.profile
    assert reg.factors() == {("a", 0, 1): 0.5, ("a", 1, 3): 1.5}


def test_a_corrected_node_is_planned_around(model_dir: Path) -> None:
    from noodle.solvers import solve

    reg = ClusterRegistry()
    for n in ("a", "b"):
        reg.join(_join(n, [0.05, 1.0, 1.0, 1.0, 1.0, 0.05]))

    def plan() -> dict:
        problem = parse_spec(cluster_spec(reg.records(), model_dir, concurrency=4), source="t").to_problem(model_dir)
        result = solve(problem, solver="auto", time_limit_s=5)
        return {s.node: s.end - s.start for s in result.plan.stages}

    even = plan()
    assert sorted(even.values()) == [3, 3]
    reg.correct("a", 0, 3, 3.0)  # a's stage ran 3x slower than its table: it gets fewer units
    reg.correct("b", 3, 6, 1.0)  # b's ran as its table said
    slowed = plan()
    assert slowed.get("a", 0) < slowed["b"]


def test_a_node_that_has_not_served_is_priced_with_its_peers_shared_bias(model_dir: Path) -> None:
    reg = ClusterRegistry()
    for n in ("a", "b", "c"):
        reg.join(_join(n, [0.05, 1.0, 1.0, 1.0, 1.0, 0.05]))
    reg.correct("a", 0, 3, 1.3)  # both serving nodes run 1.3x / 3x their tables; c has not served yet
    reg.correct("b", 3, 6, 3.0)

    def decode_ms(node: str) -> float:
        spec = cluster_spec(reg.records(), model_dir)
        doc = next(n for n in spec["cluster"]["nodes"] if n["id"] == node)
        return sum(u["latency_ms"] for u in doc["profile"]["units"])  # decode at the profile's batch size, 1

    assert decode_ms("c") == pytest.approx(4.1 * 1.3)  # the smallest factor: what every node showed
    assert decode_ms("b") == pytest.approx(4.1 * 3.0)
    reg.correct("a", 0, 3, 4.0)  # now every serving node is far off its table: its own trouble, not shared
    assert decode_ms("c") == pytest.approx(4.1)


def test_a_reported_step_overhead_reaches_the_table_the_spec_and_the_corrections(model_dir: Path) -> None:
    from noodle.serve.registry import corrected, table_ms

    body = _body("a", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    body["costs"]["step_overhead_ms"] = {"decode_ms": 0.5, "prefill_ms": 2.0}
    reg = ClusterRegistry()
    rec = reg.join(JoinRequest.model_validate(body))
    assert rec.profile.step_overhead_ms == 0.5 and rec.profile.prefill_overhead_ms == 2.0
    assert table_ms(rec, 1, 3) == pytest.approx(5.5)  # the units plus the stage's overhead, as the planner prices it
    reg.correct("a", 1, 3, 2.0)
    prof = corrected(reg.records()[0].profile, reg.records()[0].corrections)
    assert prof.step_overhead_ms == pytest.approx(1.0)  # scaled with the stage: corrected cost = factor x table
    node = next(n for n in cluster_spec(reg.records(), model_dir)["cluster"]["nodes"] if n["id"] == "a")
    assert node["profile"]["step_overhead_ms"] == pytest.approx(1.0)
    old = reg.join(_join("b", 1.0))  # a worker from before the overhead: none
    assert old.profile.step_overhead_ms == 0.0 and table_ms(old, 0, 6) == pytest.approx(1.0)


@pytest.mark.parametrize("overhead, field", [({"decode_ms": -1.0, "prefill_ms": 0.0}, "decode_ms"),
                                             ({"decode_ms": 0.1}, "prefill_ms"),
                                             ({"decode_ms": float("nan"), "prefill_ms": 0.0}, "decode_ms")])
def test_a_bad_step_overhead_is_refused_naming_the_field(overhead: dict, field: str) -> None:
    body = _body("a", 1.0)
    body["costs"]["step_overhead_ms"] = overhead
    with pytest.raises(ValidationError, match=rf"costs\.step_overhead_ms\.{field}"):
        JoinRequest.model_validate(body)
