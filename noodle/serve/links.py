"""The links the coordinator measured: the latest figures per ordered pair, and which re-measures matter.

:class:`LinkTable` keeps one :class:`LinkSample` per ``(source, target)`` (source = the worker that
probed, or :data:`COORDINATOR` for the coordinator's own probes). :meth:`LinkTable.record` says
whether a sample changes the link *materially*: a pair seen for the first time, or one whose time
to carry the probe's large payload (``latency + bytes / bandwidth``) moved by more than
``threshold`` (25 %) and by more than ``floor_ms`` (0.5 ms; sub-millisecond loopback figures
jitter by more than 25 % from one probe to the next). The registry then bumps its version, and
the controller weighs a re-plan (with its own gain threshold and cooldown).

:meth:`LinkTable.measurements` gives the links the spec carries, per source node, in one of two
:data:`LINK_MODES`: ``direct`` (what each worker measured to its peers: what a ring or torchrpc
deployment pays) or ``relay`` (the grpc executor's star, which the coordinator runs: stage k's
output goes worker a -> coordinator -> worker b). A relayed hop a->b is priced from the
coordinator's own probes of a and b (:func:`relay_link`)::

    latency   = lat(a, coord) + lat(coord, b)
    bandwidth = 1 / (1 / bw(a, coord) + 1 / bw(coord, b))      (the two legs in series)

A probe of a worker measures both directions; the slower one's bandwidth and the one-way latency
(half the round trip) are used for either leg. A pair whose relay legs are not both measured yet
keeps the workers' direct figures when there are some (else the spec's default).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from noodle.cluster import LinkMeasurement
from noodle.sizes import MAX_SCORE, MIN_SCORE

__all__ = ["COORDINATOR", "LINK_MODES", "LinkSample", "LinkTable", "hop_ms", "relay_link"]

COORDINATOR = "(coordinator)"  # not a valid node id, so it never names a worker
LINK_MODES = ("direct", "relay")


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


def relay_link(a: LinkSample, b: LinkSample) -> tuple[float, float]:
    """``(bandwidth_gbps, latency_ms)`` of a hop relayed through the coordinator, from its probes ``a`` and ``b``
    of the two workers: the latencies add, the bandwidths combine in series."""
    return 1.0 / (1.0 / a.bandwidth_gbps + 1.0 / b.bandwidth_gbps), a.latency_ms + b.latency_ms


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

    def measurements(self, ids: Iterable[str] | None = None, *,
                     mode: str = "direct") -> dict[str, tuple[LinkMeasurement, ...]]:  # fmt: skip
        """Per source node, its links to the others (``ids`` only, when given): for the spec's links.

        ``mode``: ``direct`` (what each worker measured to its peers) or ``relay`` (through the coordinator,
        see the module docstring).
        """
        if mode not in LINK_MODES:
            raise ValueError(f"links mode {mode!r}; one of {', '.join(LINK_MODES)}")
        keep = None if ids is None else set(ids)
        samples = self.samples()
        pairs: dict[tuple[str, str], tuple[float, float]] = {}
        for s in samples:
            if s.source != COORDINATOR and (keep is None or (s.source in keep and s.target in keep)):
                pairs[(s.source, s.target)] = (s.bandwidth_gbps, s.latency_ms)
        if mode == "relay":
            legs = {s.target: s for s in samples if s.source == COORDINATOR and (keep is None or s.target in keep)}
            for a in legs:
                for b in legs:
                    if a != b:
                        pairs[(a, b)] = relay_link(legs[a], legs[b])
        out: dict[str, list[LinkMeasurement]] = {}
        for (a, b), (bw, lat) in sorted(pairs.items()):
            out.setdefault(a, []).append(LinkMeasurement(
                peer=b, bandwidth_gbps=min(max(bw, MIN_SCORE), MAX_SCORE), latency_ms=lat))
        return {k: tuple(v) for k, v in out.items()}

    def rows(self, now: float | None = None) -> list[dict[str, Any]]:
        """The samples as JSON rows with their age, for ``GET /noodle/cluster``."""
        now = time.time() if now is None else now
        return [{**s.__dict__, "age_s": now - s.t} for s in self.samples()]
