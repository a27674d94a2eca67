"""``noodle serve --cluster`` measures the links between its workers, in the background.

:class:`LinkProber` runs one thread. It probes, one probe at a time (concurrent probes would
share the wire and under-report each other's bandwidth):

* every **ordered** pair of live workers ``(a, b)``: the coordinator asks ``a`` to ``Probe`` ``b``'s
  address (``a`` times ``Echo`` calls to ``b``, see :mod:`noodle.executors.grpc.probe`). Both
  directions are probed because a path can be slower one way (a proxy, a VPN, asymmetric
  routes); the spec's pair takes the slower of the two (:func:`noodle.cluster.export_spec`);
* the coordinator itself to every live worker (its own ``Echo`` calls), shown as source
  :data:`~noodle.serve.links.COORDINATOR` in ``noodle cluster status``; the spec has no node for
  the coordinator, so these figures are not in the export.

When: the pairs of a worker that joined (or joined again at a new address) right away, and every
pair every ``interval_s`` seconds (``--probe-interval``, default 60; 0 turns probing off and the
spec keeps its default link). Payloads are the plan's activations in float32 (:func:`probe_sizes`):
a decode hop's ``hidden x 4`` bytes for the round trip and a prefill hop's ``hidden x prompt tokens
x 4`` bytes (prompt = 3/4 of the model's context, as :func:`~noodle.serve.registry.cluster_spec`
plans; at most :data:`~noodle.executors.grpc.probe.MAX_PROBE_BYTES`) for the bandwidth. The
one-way latency recorded is half the median round trip. Results go to the registry
(:meth:`~noodle.serve.registry.ClusterRegistry.record_link`), which marks a material change so
the controller weighs a re-plan. A probe that fails is reported once as an event (again only when
its message changes); it never marks a worker dead (heartbeats do that).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from noodle.executors.grpc import stage_service_pb2 as pb
from noodle.executors.grpc import stage_service_pb2_grpc as pb_grpc
from noodle.executors.grpc.probe import MAX_PROBE_BYTES, PROBE_VERSION, ProbeRefused, measure, open_channel
from noodle.models.card import ModelCard, read_card
from noodle.serve.claims import link_problem
from noodle.serve.links import COORDINATOR, LinkSample
from noodle.serve.registry import ClusterRegistry, WorkerRecord

__all__ = ["ProbeSizes", "probe_sizes", "LinkProber"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSizes:
    """Payload bytes: ``small`` for the round trip (a decode hop), ``large`` for bandwidth (a prefill hop)."""

    small: int
    large: int


def probe_sizes(model: Path | ModelCard) -> ProbeSizes:
    """A decode hop's and a prefill hop's activation in float32 for ``model`` (a folder or its card; see the
    module docstring)."""
    card = model if isinstance(model, ModelCard) else read_card(model)
    hidden = card.hidden_size or 4096
    prompt = max(1, (card.context_tokens or 2048) * 3 // 4)
    small = hidden * 4
    return ProbeSizes(small=small, large=max(min(hidden * prompt * 4, MAX_PROBE_BYTES), 2 * small))


class LinkProber:
    """Probes the registry's live workers in a background thread (see the module docstring).

    Args:
        registry: where the workers are and where the results go.
        sizes: the probe payloads.
        token: the cluster token (the workers' gRPC token).
        events: the status page's event log (``.add(level, text)``).
        interval_s: seconds between full rounds; 0: no probing at all.
        rounds: round trips per payload size and direction.
        timeout_s: one probe's deadline.
    """

    def __init__(self, registry: ClusterRegistry, sizes: ProbeSizes, *, token: str | None, events: Any,
                 interval_s: float = 60.0, rounds: int = 5, timeout_s: float = 10.0, tick_s: float = 0.5) -> None:  # fmt: skip
        self.registry = registry
        self.sizes = sizes
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.events = events
        self.interval_s = interval_s
        self.rounds = rounds
        self.timeout_s = timeout_s
        self.tick_s = tick_s
        self.failures: dict[tuple[str, str], str] = {}
        self._seen: dict[str, tuple[str, float]] = {}
        self._last_full = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="noodle-link-probe", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 5)

    # -- scheduling ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - the prober must outlive one bad round
                log.warning("link probe round failed: %s: %s", type(exc).__name__, exc, exc_info=True)

    def step(self, now: float | None = None) -> list[LinkSample]:
        """One scheduling decision: a full round when due, else the pairs of workers new since the last one."""
        now = time.monotonic() if now is None else now
        live = self.registry.records(alive_only=True)
        keys = {r.id: (r.address, r.joined_at) for r in live}
        if now - self._last_full >= self.interval_s:
            self._last_full = now
            fresh = None
        else:
            fresh = {nid for nid, key in keys.items() if self._seen.get(nid) != key}
            if not fresh:
                return []
        self._seen = keys
        return self.probe(live, only=fresh)

    def probe(self, live: list[WorkerRecord], only: set[str] | None = None) -> list[LinkSample]:
        """Probe the pairs among ``live`` (those touching ``only``, when given) and the coordinator's links."""
        done: list[LinkSample] = []
        for a in [None, *live]:
            for b in live:
                touches = only is None or b.id in only or (a is not None and a.id in only)
                if (a is not None and a.id == b.id) or not touches:
                    continue
                if self._stop.is_set():
                    return done
                sample = self._one(a, b)
                if sample is not None:
                    done.append(sample)
                    self.registry.record_link(sample)
        return done

    # -- one probe ----------------------------------------------------------------------------------
    def _one(self, a: WorkerRecord | None, b: WorkerRecord) -> LinkSample | None:
        source = COORDINATOR if a is None else a.id
        try:
            if a is None:
                fig = self._from_here(b)
                rtt, up, down, nbytes, rounds = fig.rtt_ms, fig.up_gbps, fig.down_gbps, fig.bytes, fig.rounds
            else:
                reply = self._ask(a, b)
                rtt, up, down, nbytes, rounds = reply.rtt_ms, reply.up_gbps, reply.down_gbps, reply.bytes, reply.rounds
                wrong = link_problem(rtt, up, down)
                if wrong:  # a worker's own figures: kept only within the spec's link bounds
                    self._failed(source, b.id, f"worker {a.id} reports figures out of the spec's bounds ({wrong}); "
                                               "the link keeps the spec's default")  # fmt: skip
                    return None
        except ProbeRefused as exc:
            self._failed(source, b.id, str(exc))
            return None
        if self.failures.pop((source, b.id), None) is not None:
            self.events.add("info", f"link {source} -> {b.id} measured again")
        return LinkSample(source=source, target=b.id, latency_ms=rtt / 2, bandwidth_gbps=min(up, down), rtt_ms=rtt,
                          up_gbps=up, down_gbps=down, bytes=nbytes, rounds=rounds, t=time.time())  # fmt: skip

    def _from_here(self, b: WorkerRecord) -> Any:
        channel = open_channel(b.address, max_bytes=self.sizes.large)
        try:
            return measure(pb_grpc.StageServiceStub(channel), self.metadata, small_bytes=self.sizes.small,
                           large_bytes=self.sizes.large, rounds=self.rounds, timeout_s=self.timeout_s,
                           peer=f"{b.id} ({b.address})")  # fmt: skip
        finally:
            channel.close()

    def _ask(self, a: WorkerRecord, b: WorkerRecord) -> pb.ProbeReply:
        channel = open_channel(a.address, max_bytes=2**20)
        request = pb.ProbeRequest(peer=b.address, small_bytes=self.sizes.small, large_bytes=self.sizes.large,
                                  rounds=self.rounds, timeout_s=self.timeout_s, version=PROBE_VERSION)  # fmt: skip
        try:
            return pb_grpc.StageServiceStub(channel).Probe(request, timeout=self.timeout_s + 5, metadata=self.metadata)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                details = (f"worker {a.id} ({a.address}) does not implement link probing ({PROBE_VERSION}; an older "
                           f"noodle): upgrade it; its links keep the spec's default")  # fmt: skip
            raise ProbeRefused(code, f"{code.name}: {details}") from None
        finally:
            channel.close()

    def _failed(self, source: str, target: str, message: str) -> None:
        if self.failures.get((source, target)) == message:
            return
        self.failures[(source, target)] = message
        self.events.add("warning", f"link {source} -> {target}: probe failed: {message}")
