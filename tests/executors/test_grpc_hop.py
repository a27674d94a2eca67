"""A gRPC lane measures its hop: the call's round trip beyond the worker's own compute (issue 20, item 6)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from noodle.executors.grpc.lanes import GrpcLane


class _Stream:
    """Answers after ``wall_s``, the worker saying it computed for ``compute_ms``."""

    def __init__(self, wall_s: float, compute_ms: float) -> None:
        self.wall_s, self.compute_ms = wall_s, compute_ms

    def call(self, req: object, timeout: float) -> SimpleNamespace:
        time.sleep(self.wall_s)
        return SimpleNamespace(t_in_ns=1_000, t_out_ns=1_000 + int(self.compute_ms * 1e6))


def _lane(stream: _Stream) -> GrpcLane:
    lane = GrpcLane.__new__(GrpcLane)  # only what _send touches
    lane._sessions, lane._stream, lane.last_hop_ms = {"s": "w-s"}, stream, 0.0
    lane.ex = SimpleNamespace(step_timeout_s=lambda doc, req: 10.0)
    lane.doc = None
    return lane


def test_hop_is_the_round_trip_beyond_the_workers_compute() -> None:
    lane = _lane(_Stream(0.05, 20.0))
    lane._send("s", SimpleNamespace(session="", top1=True))
    assert 30.0 - 5 <= lane.last_hop_ms <= 30.0 + 200  # 50 ms round trip - 20 ms compute; a busy box adds
    lane._stream = _Stream(0.01, 500.0)  # a worker clock saying more than the round trip: no negative hop
    lane._send("s", SimpleNamespace(session="", top1=True))
    assert lane.last_hop_ms == pytest.approx(0.0)
