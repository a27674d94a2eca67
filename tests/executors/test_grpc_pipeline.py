"""The grpc executor's pipeline on real worker processes: 16 sequences in flight, failover with groups in flight."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from noodle.executors.failover import RetryPolicy
from noodle.executors.grpc.coordinator import GrpcExecutor

from .conformance import alone, plan_for, random_requests
from .procs import WorkerPool, children

TOKEN = "pipe-token-77aa"
FAST = RetryPolicy(step_timeout_s=3.0, health_timeout_s=0.5, attempts=2, backoff_s=0.05)


@pytest.fixture(scope="module")
def pool(tiny_models, spawner) -> Iterator[WorkerPool]:
    before = {p.pid for p in children()}
    p = WorkerPool(tiny_models["llama"], 4, cli=0, token=TOKEN)
    try:
        yield p
    finally:
        p.close()
    assert not [c for c in children() if c.pid not in before], "worker processes left behind"




def test_sixteen_in_flight_on_three_workers_equal_generate_alone(tiny_models, pool):
    model = tiny_models["llama"]
    addrs = {f"node{i}": w.address for i, w in enumerate(pool.workers[:3])}
    work = random_requests(16, seed=5)
    with GrpcExecutor(plan_for(model, [0, 2, 4, 6]), model, workers=addrs, token=TOKEN) as ex:
        with ex.pipeline(concurrency=8, prefill_chunk=4) as pipe:
            comps = [h.result(timeout=120) for h in [pipe.submit(p, max_new_tokens=n) for p, n in work]]
            stats = pipe.stats()
    for (p, n), c in zip(work, comps):
        assert c.tokens == alone(model, p, n)
    assert all(s.steps > 0 and s.bytes_out > 0 for s in stats.stages)


def _kill_after_tokens(n: int, worker) -> tuple[threading.Event, callable]:
    count = [0]
    lock = threading.Lock()
    fired = threading.Event()

    def on_token(_: int) -> None:
        with lock:
            count[0] += 1
            if count[0] == n and not fired.is_set():
                fired.set()
                worker.kill()

    return fired, on_token


def test_a_killed_worker_moves_to_a_spare_with_every_group_replayed(tiny_models, pool):
    model = tiny_models["llama"]
    a, b, _, d = pool.workers
    work = random_requests(8, seed=9)
    fired, on_token = _kill_after_tokens(6, b)
    with GrpcExecutor(plan_for(model, [0, 3, 6]), model, workers={"node0": a.address, "node1": b.address},
                      spares=[d.address], token=TOKEN, policy=FAST, log=lambda _: None) as ex:  # fmt: skip
        with ex.pipeline(concurrency=4) as pipe:
            comps = [h.result(timeout=120) for h in [pipe.submit(p, max_new_tokens=n, on_token=on_token) for p, n in work]]
            assert [e.action for e in pipe.stats().failovers] == ["spare"]  # what noodle serve shows
        events = list(ex.failovers)
    assert fired.is_set() and not b.alive
    assert [c.finish_reason for c in comps].count("error") == 0
    for (p, n), c in zip(work, comps):
        assert c.tokens == alone(model, p, n)
    (ev,) = events
    assert ev.action == "spare" and ev.node == "node1" and d.address in ev.detail and ev.replayed_steps >= 1


def test_without_a_spare_the_stage_moves_to_a_neighbours_worker(tiny_models, pool):
    model = tiny_models["llama"]
    a, b, c, d = pool.workers
    assert not b.alive and d.alive
    work = random_requests(8, seed=13)
    fired, on_token = _kill_after_tokens(5, d)
    addrs = {"node0": a.address, "node1": d.address, "node2": c.address}
    with GrpcExecutor(plan_for(model, [0, 2, 4, 6]), model, workers=addrs, token=TOKEN, policy=FAST,
                      log=lambda _: None) as ex:  # fmt: skip
        with ex.pipeline(concurrency=4) as pipe:
            comps = [h.result(timeout=120) for h in [pipe.submit(p, max_new_tokens=n, on_token=on_token) for p, n in work]]
        events = list(ex.failovers)
    assert fired.is_set()
    for (p, n), comp in zip(work, comps):
        assert comp.tokens == alone(model, p, n)
    (ev,) = events
    assert ev.action == "merged" and ev.node == "node1"
