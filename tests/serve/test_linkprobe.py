"""The coordinator's link prober against real in-process workers, one behind a 20 ms delay proxy.

Links to the delayed worker must come out ~20 ms one way and the others sub-millisecond, in the
registry and in the spec ``noodle cluster export`` prints; a link whose figures change is a
registry change (the controller weighs a re-plan); an old worker is one clear event.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from noodle.executors.grpc import stage_service_pb2 as pb
from noodle.executors.grpc.server import serve
from noodle.executors.grpc.worker import WorkerConfig
from noodle.serve.linkprobe import LinkProber, probe_sizes
from noodle.serve.links import COORDINATOR, LinkSample, LinkTable
from noodle.serve.registry import ClusterRegistry, JoinRequest, cluster_spec
from noodle.spec import parse_spec

from ..delayproxy import DelayProxy
from .test_registry import _costs as unit_costs

TOKEN = "links-token-3a9d"


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, level: str, text: str) -> None:
        self.items.append((level, text))


def _join(node: str, address: str) -> JoinRequest:
    return JoinRequest.model_validate({
        "id": node, "address": address, "model_hash": "abc", "weights_sha256": "0" * 64,
        "device": {"kind": "cpu", "name": "x", "total_memory_bytes": 8 * 2**30, "free_memory_bytes": 4 * 2**30, "threads": 1},
        "costs": unit_costs(1.0),
    })  # fmt: skip


def _sample(latency_ms: float, gbps: float, nbytes: int = 49_152) -> LinkSample:
    return LinkSample(source="a", target="b", latency_ms=latency_ms, bandwidth_gbps=gbps, rtt_ms=2 * latency_ms,
                      up_gbps=gbps, down_gbps=gbps, bytes=nbytes, rounds=16, t=0.0)  # fmt: skip


def test_only_material_link_changes_count() -> None:
    table = LinkTable()
    assert table.record(_sample(0.20, 5.0))  # new
    assert not table.record(_sample(0.28, 3.5))  # +40 % on a sub-ms hop: jitter, under the 0.5 ms floor
    assert table.record(_sample(20.0, 3.5))  # 20 ms: material
    assert not table.record(_sample(22.0, 3.5))  # +10 %
    big = 16 * 2**20
    table.record(_sample(1.0, 10.0, big))
    assert table.record(_sample(1.0, 5.0, big))  # half the bandwidth on a 16 MiB hop: 14 -> 28 ms
    assert [s.latency_ms for s in table.samples()] == [1.0]


def _leg(source: str, target: str, latency_ms: float, gbps: float) -> LinkSample:
    return LinkSample(source=source, target=target, latency_ms=latency_ms, bandwidth_gbps=gbps, rtt_ms=2 * latency_ms,
                      up_gbps=gbps, down_gbps=gbps, bytes=49_152, rounds=5, t=0.0)  # fmt: skip


def test_relay_links_compose_the_coordinators_legs() -> None:
    """The grpc star: a hop a -> b crosses a -> coordinator -> b; latencies add, bandwidths combine in series."""
    table = LinkTable()
    table.record(_leg("a", "b", 0.1, 10.0))  # the workers' direct link, fast
    table.record(_leg("b", "a", 0.1, 10.0))
    table.record(_leg("a", "c", 0.3, 2.0))  # c is not probed by the coordinator yet
    table.record(_leg(COORDINATOR, "a", 2.0, 1.0))
    table.record(_leg(COORDINATOR, "b", 20.0, 4.0))
    direct = table.measurements()
    assert {(k, m.peer): (m.bandwidth_gbps, m.latency_ms) for k, v in direct.items() for m in v} == {
        ("a", "b"): (10.0, 0.1), ("b", "a"): (10.0, 0.1), ("a", "c"): (2.0, 0.3)}
    relay = {(k, m.peer): (m.bandwidth_gbps, m.latency_ms) for k, v in table.measurements(mode="relay").items()
             for m in v}
    assert relay[("a", "b")] == pytest.approx((1 / (1 / 1.0 + 1 / 4.0), 22.0))  # 0.8 Gb/s, 2 + 20 ms
    assert relay[("b", "a")] == pytest.approx((0.8, 22.0))
    assert relay[("a", "c")] == (2.0, 0.3)  # a leg not measured yet: the direct figures stay
    only = table.measurements(ids=["a", "c"], mode="relay")
    assert [(m.peer, m.latency_ms) for m in only["a"]] == [("c", 0.3)]
    with pytest.raises(ValueError, match="links mode 'star'"):
        table.measurements(mode="star")


def test_the_relay_spec_prices_a_hop_through_the_coordinator(model_dir: Path) -> None:
    from noodle.profile.pernode import PerNodeCostModel

    reg = ClusterRegistry()
    for node in ("a", "b"):
        reg.join(_join(node, f"127.0.0.1:{5000 + ord(node)}"))
        reg.record_link(_leg(node, "b" if node == "a" else "a", 0.05, 20.0))
    reg.record_link(_leg(COORDINATOR, "a", 1.0, 2.0))
    reg.record_link(_leg(COORDINATOR, "b", 3.0, 2.0))
    hops = {}
    for mode in ("direct", "relay"):
        data = cluster_spec(reg.records(), model_dir, links=reg.links.measurements(mode=mode))
        problem = parse_spec(data, source="t").to_problem(model_dir, source="t")
        a, b = problem.cluster.node("a"), problem.cluster.node("b")
        hops[mode] = PerNodeCostModel().hop_ms(problem, a, b, 2)
        assert PerNodeCostModel().return_ms(problem, b, a) == pytest.approx(0.05 if mode == "direct" else 4.0)
    act = 4 * 64  # the tiny GPT-2's hidden size in float32
    assert hops["direct"] == pytest.approx(0.05 + act * 8 / 20e9 * 1e3)
    assert hops["relay"] == pytest.approx(4.0 + act * 8 / 1e9 * 1e3)  # 1 + 3 ms; 2 Gb/s legs in series: 1 Gb/s


@pytest.fixture(scope="module")
def workers(model_dir: Path) -> Iterator[list[Any]]:
    started = [serve(WorkerConfig(model_dir=model_dir, port=0, token=TOKEN)) for _ in range(4)]
    yield started
    for server, servicer, _ in started:
        server.stop(0)
        servicer.close()


def test_prober_measures_real_links_and_the_spec_carries_them(model_dir: Path, workers: list[Any]) -> None:
    ports = [port for _, _, port in workers]
    with DelayProxy(("127.0.0.1", ports[2]), delay_s=0.020) as proxy:
        reg = ClusterRegistry(model_hash="abc")
        for name, address in (("w1", f"127.0.0.1:{ports[0]}"), ("w2", f"127.0.0.1:{ports[1]}"), ("w3", proxy.address)):
            reg.join(_join(name, address))
        events = Events()
        prober = LinkProber(reg, probe_sizes(model_dir), token=TOKEN, events=events, interval_s=60)
        assert (prober.sizes.small, prober.sizes.large) == (64 * 4, 64 * 192 * 4)  # gpt2-tiny: 64 wide, 256 positions
        v = reg.version
        samples = prober.step(now=0.0)
        assert not events.items, events.items
        assert len(samples) == 3 + 6 and reg.version == v + 9  # each new link is a change
        lat = {(s.source, s.target): s.latency_ms for s in samples}
        print("\nmeasured one-way latency ms: " + ", ".join(f"{a}->{b} {x:.2f}" for (a, b), x in sorted(lat.items())))
        for (a, b), ms in lat.items():
            if b == "w3":  # everything that reaches w3 passes the proxy
                assert 18.0 < ms < 40.0, (a, b, ms)
            else:
                assert ms < 5.0, (a, b, ms)

        spec = cluster_spec(reg.records(), model_dir, links=reg.links.measurements())
        pairs = {(p["a"], p["b"]): p for p in spec["cluster"]["links"]["pairs"]}
        assert set(pairs) == {("w1", "w2"), ("w1", "w3"), ("w2", "w3")}
        assert pairs[("w1", "w2")]["latency_ms"] < 5.0
        assert 18.0 < pairs[("w1", "w3")]["latency_ms"] < 40.0 and 18.0 < pairs[("w2", "w3")]["latency_ms"] < 40.0
        default = spec["cluster"]["links"]["default"]
        assert default["latency_ms"] == max(p["latency_ms"] for p in pairs.values())
        parse_spec(spec, source="test").to_problem(model_dir, source="test")

        assert prober.step(now=1.0) == []  # nothing new, not due
        reg.join(_join("w4", f"127.0.0.1:{ports[3]}"))
        fresh = prober.step(now=2.0)  # the newcomer's links only, at once
        assert sorted((s.source, s.target) for s in fresh) == sorted(
            [(COORDINATOR, "w4"), ("w1", "w4"), ("w4", "w1"), ("w2", "w4"), ("w4", "w2"), ("w3", "w4"), ("w4", "w3")])

        proxy.delay_s = 0.0  # the slow path heals: a material change, the registry moves
        v = reg.version
        healed = prober.probe(reg.records(alive_only=True), only={"w3"})
        assert reg.version > v
        assert all(s.latency_ms < 5.0 for s in healed), [(s.source, s.target, s.latency_ms) for s in healed]


def test_an_old_worker_is_one_clear_event(model_dir: Path, workers: list[Any]) -> None:
    health = grpc.unary_unary_rpc_method_handler(lambda req, ctx: pb.HealthReply(status="serving", version="noodle.stage.v1"),
                                                 request_deserializer=pb.HealthRequest.FromString,
                                                 response_serializer=pb.HealthReply.SerializeToString)  # fmt: skip
    old = grpc.server(futures.ThreadPoolExecutor(2))
    old.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("noodle.stage.v1.StageService", {"Health": health}),))
    port = old.add_insecure_port("127.0.0.1:0")
    old.start()
    try:
        reg = ClusterRegistry()
        reg.join(_join("new", f"127.0.0.1:{workers[0][2]}"))
        reg.join(_join("old", f"127.0.0.1:{port}"))
        events = Events()
        prober = LinkProber(reg, probe_sizes(model_dir), token=TOKEN, events=events, interval_s=60)
        done = prober.step(now=0.0)
        assert [(s.source, s.target) for s in done] == [(COORDINATOR, "new")]
        text = "\n".join(t for _, t in events.items)
        assert len(events.items) == 3 and "Traceback" not in text
        assert "worker old" in text and "does not implement link probing" in text  # old -> new: no Probe
        assert text.count("does not implement Echo") == 2  # coordinator -> old, new -> old
        prober.step(now=100.0)
        assert len(events.items) == 3  # the same failure is not reported again
        assert cluster_spec(reg.records(), model_dir, links=reg.links.measurements())["cluster"]["links"]["pairs"] == []
    finally:
        old.stop(0)


def test_a_workers_link_figures_out_of_the_spec_bounds_are_not_kept(model_dir: Path, workers: list[Any]) -> None:
    def rogue_probe(req: Any, ctx: Any) -> Any:
        return pb.ProbeReply(peer=req.peer, rtt_ms=0.001, bandwidth_gbps=1e15, up_gbps=1e15, down_gbps=1e15,
                             bytes=req.large_bytes, rounds=req.rounds, seconds=0.01, version=req.version)

    handlers = {"Probe": grpc.unary_unary_rpc_method_handler(rogue_probe, request_deserializer=pb.ProbeRequest.FromString,
                                                             response_serializer=pb.ProbeReply.SerializeToString)}  # fmt: skip
    rogue = grpc.server(futures.ThreadPoolExecutor(2))
    rogue.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("noodle.stage.v1.StageService", handlers),))
    port = rogue.add_insecure_port("127.0.0.1:0")
    rogue.start()
    try:
        reg = ClusterRegistry()
        reg.join(_join("new", f"127.0.0.1:{workers[0][2]}"))
        reg.join(_join("rogue", f"127.0.0.1:{port}"))
        events = Events()
        prober = LinkProber(reg, probe_sizes(model_dir), token=TOKEN, events=events, interval_s=60)
        done = prober.step(now=0.0)
        assert ("rogue", "new") not in [(s.source, s.target) for s in done]
        text = "\n".join(t for _, t in events.items)
        assert "worker rogue reports figures out of the spec's bounds (up_gbps 1e+15 is outside [1e-06, 1e+06])" in text
        pairs = cluster_spec(reg.records(), model_dir, links=reg.links.measurements())["cluster"]["links"]["pairs"]
        assert all(p["bandwidth_gbps"] <= 1e6 for p in pairs), pairs
    finally:
        rogue.stop(0)
