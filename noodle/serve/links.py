"""The links the coordinator measured: the latest figures per ordered pair, and which re-measures matter.

:class:`LinkTable` keeps one :class:`LinkSample` per ``(source, target)`` (source = the worker that
probed, or :data:`COORDINATOR` for the coordinator's own probes). :meth:`LinkTable.record` says
whether a sample changes the link *materially*: a pair seen for the first time, or one whose time
to carry the probe's large payload (``latency + bytes / bandwidth``) moved by more than
``threshold`` (25 %) and by more than ``floor_ms`` (0.5 ms; sub-millisecond loopback figures
jitter by more than 25 % from one probe to the next). The registry then bumps its version, and
the controller weighs a re-plan (with its own gain threshold and cooldown).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from noodle.cluster import LinkMeasurement
from noodle.spec import MAX_SCORE, MIN_SCORE

__all__ = ["COORDINATOR", "LinkSample", "LinkTable", "hop_ms"]

COORDINATOR = "(coordinator)"  # not a valid node id, so it never names a worker


@dataclass(frozen=True)
class LinkSample:
    """One probe's result: ``latency_ms`` is one-way (half the median round trip)."""

    source: str
    target: str
    latency_ms: float
    bandwidth_gbps: float
    rtt_ms: float
    up_gbps: float
    down_gbps: float
    bytes: int
    rounds: int
    t: float  # wall clock, seconds


def hop_ms(latency_ms: float, bandwidth_gbps: float, nbytes: int) -> float:
    """Time to carry ``nbytes`` over a link: its latency plus the bytes at its bandwidth."""
    return latency_ms + nbytes * 8 / (bandwidth_gbps * 1e6)


class LinkTable:
    """Thread-safe latest sample per ordered pair (see the module docstring)."""

    def __init__(self, *, threshold: float = 0.25, floor_ms: float = 0.5) -> None:
        self.threshold = threshold
        self.floor_ms = floor_ms
        self._lock = threading.Lock()
        self._samples: dict[tuple[str, str], LinkSample] = {}

    def record(self, sample: LinkSample) -> bool:
        """Store ``sample``; True when it is new or changes the link materially."""
        key = (sample.source, sample.target)
        with self._lock:
            old = self._samples.get(key)
            self._samples[key] = sample
        if old is None:
            return True
        before = hop_ms(old.latency_ms, old.bandwidth_gbps, sample.bytes)
        after = hop_ms(sample.latency_ms, sample.bandwidth_gbps, sample.bytes)
        return abs(after - before) > max(self.threshold * before, self.floor_ms)

    def samples(self) -> list[LinkSample]:
        with self._lock:
            return sorted(self._samples.values(), key=lambda s: (s.source, s.target))

    def measurements(self, ids: Iterable[str] | None = None) -> dict[str, tuple[LinkMeasurement, ...]]:
        """Per source node, what it measured to the others (``ids`` only, when given): for the spec's links."""
        keep = None if ids is None else set(ids)
        out: dict[str, list[LinkMeasurement]] = {}
        for s in self.samples():
            if s.source == COORDINATOR or (keep is not None and (s.source not in keep or s.target not in keep)):
                continue
            out.setdefault(s.source, []).append(LinkMeasurement(
                peer=s.target, bandwidth_gbps=min(max(s.bandwidth_gbps, MIN_SCORE), MAX_SCORE), latency_ms=s.latency_ms))
        return {k: tuple(v) for k, v in out.items()}

    def rows(self, now: float | None = None) -> list[dict[str, Any]]:
        """The samples as JSON rows with their age, for ``GET /noodle/cluster``."""
        now = time.time() if now is None else now
        return [{**s.__dict__, "age_s": now - s.t} for s in self.samples()]
