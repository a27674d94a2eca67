"""Link probing (``noodle.probe.v1``): how long a hop takes between two machines, measured with gRPC calls.

Two calls on the worker's stage service, behind its :class:`~noodle.executors.grpc.gate.CallGate`
like every other call (token first, call caps, body deadline):

* ``Echo(payload, reply_bytes)``: the worker discards ``payload`` and answers ``reply_bytes`` zero
  bytes. The caller times it: an empty-ish payload gives the round trip; a large ``payload`` the
  upload (caller -> worker), a large ``reply_bytes`` the download (worker -> caller).
* ``Probe(peer, small_bytes, large_bytes, rounds, timeout_s)``: the worker measures *its* link to a
  peer worker with Echo calls (it sends the cluster token, its own): :func:`measure`.

:func:`measure` makes one warm-up call (connects, checks the peer speaks ``noodle.probe.v1``), then
``rounds`` calls of each kind: ``small_bytes`` up (the round trip, ``rtt_ms`` = their median),
``large_bytes`` up, ``large_bytes`` down. A direction's bandwidth is the payload over the extra
time it took beyond the round trip: ``(large - small) x 8 / (median(large) - median(small))``,
that extra time floored at a tenth of the large call's (a payload whose transfer is lost in the
round trip's noise gives a lower bound, not an infinite bandwidth). ``bandwidth_gbps`` is the
slower direction's.

Refused (``INVALID_ARGUMENT``, the worker keeps serving): a ``reply_bytes`` or ``large_bytes`` over
the worker's probe cap (:data:`MAX_PROBE_BYTES`, or less when its message limit is lower), a peer
that is not ``host:port``, ``rounds`` outside 1-:data:`MAX_ROUNDS`, a ``timeout_s`` outside
(0, :data:`MAX_TIMEOUT_S`]; a second probe while one runs is ``RESOURCE_EXHAUSTED``; a peer that does
not answer in time ``DEADLINE_EXCEEDED`` / ``UNAVAILABLE``; a peer that refuses the token or speaks
no probe protocol ``FAILED_PRECONDITION``. A caller that speaks another probe version is told which
one this worker speaks.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from noodle.executors.grpc import stage_service_pb2 as pb
from noodle.executors.grpc import stage_service_pb2_grpc as pb_grpc

__all__ = [
    "PROBE_VERSION", "MAX_PROBE_BYTES", "MAX_ROUNDS", "MAX_TIMEOUT_S", "ProbeRefused", "LinkFigures",
    "LinkProbes", "check_peer", "open_channel", "measure",
]  # fmt: skip

PROBE_VERSION = "noodle.probe.v1"
MAX_PROBE_BYTES = 16 * 2**20
MAX_ROUNDS = 20
MAX_TIMEOUT_S = 60.0
_SLACK = 64 * 2**10
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.\-_]*)$")


class ProbeRefused(Exception):
    """A probe or echo the worker refuses, with the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class LinkFigures:
    """One measured link: median round trip, bandwidth per direction, what was sent."""

    rtt_ms: float
    up_gbps: float
    down_gbps: float
    bytes: int
    rounds: int
    seconds: float

    @property
    def bandwidth_gbps(self) -> float:
        return min(self.up_gbps, self.down_gbps)

    @property
    def latency_ms(self) -> float:
        """One-way latency: half the round trip."""
        return self.rtt_ms / 2


def check_peer(text: str) -> str:
    """``host:port`` with a plain host name, IPv4 or bracketed IPv6 and a port in 1-65535; else ProbeRefused."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    host, sep, port = text.rpartition(":")
    if not text or len(text) > 300 or not sep or not port.isdigit() or not 0 < int(port) < 65536 or not _HOST.match(host):
        raise ProbeRefused(bad, f"peer: {text[:80]!r} is not HOST:PORT (e.g. 10.0.0.2:50051 or [::1]:50051)")
    return f"{host}:{int(port)}"


def open_channel(address: str, *, max_bytes: int, tls_ca: Path | None = None) -> grpc.Channel:
    """A channel sized for probe payloads; TLS when ``tls_ca`` is given (the CA to trust)."""
    options = [("grpc.max_receive_message_length", max_bytes + _SLACK),
               ("grpc.max_send_message_length", max_bytes + _SLACK)]  # fmt: skip
    if tls_ca is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
        return grpc.secure_channel(address, creds, options=options)
    return grpc.insecure_channel(address, options=options)


def _gbps(extra_bytes: int, big_ms: float, small_ms: float) -> float:
    extra_ms = max(big_ms - small_ms, big_ms / 10, 1e-6)
    return max(extra_bytes, 1) * 8 / (extra_ms * 1e6)


def _refusal(exc: grpc.RpcError, peer: str, timeout_s: float) -> ProbeRefused:
    code, details = exc.code(), exc.details()
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return ProbeRefused(grpc.StatusCode.FAILED_PRECONDITION,
                            f"peer {peer}: does not implement Echo (a noodle before {PROBE_VERSION}); upgrade it")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ProbeRefused(grpc.StatusCode.FAILED_PRECONDITION,
                            f"peer {peer}: refused the token ({details}); workers of one cluster share one token")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ProbeRefused(code, f"peer {peer}: the probe did not finish within {timeout_s:g} s")
    if code == grpc.StatusCode.UNAVAILABLE:
        return ProbeRefused(code, f"peer {peer}: unreachable ({details})")
    return ProbeRefused(code, f"peer {peer}: {code.name}: {details}")


def measure(stub: pb_grpc.StageServiceStub, metadata: Sequence[tuple[str, str]], *, small_bytes: int,
            large_bytes: int, rounds: int, timeout_s: float, peer: str) -> LinkFigures:  # fmt: skip
    """Time Echo calls to ``stub``'s worker (see the module docstring); raises :class:`ProbeRefused`."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    small, large = b"\0" * small_bytes, b"\0" * large_bytes

    def call(payload: bytes, reply_bytes: int) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProbeRefused(grpc.StatusCode.DEADLINE_EXCEEDED, f"peer {peer}: the probe did not finish within {timeout_s:g} s")
        start = time.perf_counter()
        reply = stub.Echo(pb.EchoRequest(payload=payload, reply_bytes=reply_bytes, version=PROBE_VERSION),
                          timeout=left, metadata=tuple(metadata))  # fmt: skip
        took = (time.perf_counter() - start) * 1e3
        if reply.version != PROBE_VERSION or reply.received_bytes != len(payload) or len(reply.payload) != reply_bytes:
            raise ProbeRefused(grpc.StatusCode.FAILED_PRECONDITION,
                               f"peer {peer}: speaks {reply.version or 'no probe protocol'!r}, this side {PROBE_VERSION}")
        return took

    try:
        call(small, 0)  # connect, check the version; not timed
        rtt = [call(small, 0) for _ in range(rounds)]
        up = [call(large, 0) for _ in range(rounds)]
        down = [call(b"", large_bytes) for _ in range(rounds)]
    except grpc.RpcError as exc:
        raise _refusal(exc, peer, timeout_s) from None
    rtt_ms = statistics.median(rtt)
    extra = large_bytes - small_bytes
    return LinkFigures(rtt_ms=rtt_ms, up_gbps=_gbps(extra, statistics.median(up), rtt_ms),
                       down_gbps=_gbps(large_bytes, statistics.median(down), rtt_ms), bytes=large_bytes,
                       rounds=3 * rounds + 1, seconds=time.monotonic() - t0)  # fmt: skip


class LinkProbes:
    """The worker's side: answers Echo, runs one Probe at a time.

    Args:
        token: sent to peers as ``authorization: Bearer`` (the cluster's one token).
        max_bytes: the largest payload an Echo may ask for or a Probe may send.
        tls_ca: with TLS, the CA peers' certificates are checked against (the worker's own certificate).
    """

    def __init__(self, token: str | None, max_bytes: int, tls_ca: Path | None = None) -> None:
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.max_bytes = max(0, min(MAX_PROBE_BYTES, max_bytes - _SLACK))
        self.tls_ca = tls_ca
        self._busy = threading.Lock()

    def _version(self, version: str) -> None:
        if version and version != PROBE_VERSION:
            raise ProbeRefused(grpc.StatusCode.FAILED_PRECONDITION,
                               f"version: this worker speaks {PROBE_VERSION}, the caller {version[:40]!r}")

    def _size(self, field: str, n: int) -> None:
        if not 0 <= n <= self.max_bytes:
            raise ProbeRefused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{field}: {n} bytes, must lie in [0, {self.max_bytes}] (this worker's probe cap)")

    def echo(self, request: pb.EchoRequest) -> pb.EchoReply:
        self._version(request.version)
        self._size("reply_bytes", request.reply_bytes)
        return pb.EchoReply(received_bytes=len(request.payload), payload=bytes(request.reply_bytes), version=PROBE_VERSION)

    def probe(self, request: pb.ProbeRequest) -> pb.ProbeReply:
        self._version(request.version)
        peer = check_peer(request.peer)
        self._size("small_bytes", request.small_bytes)
        self._size("large_bytes", request.large_bytes)
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if request.large_bytes <= request.small_bytes:
            raise ProbeRefused(bad, f"large_bytes: {request.large_bytes}, must exceed small_bytes ({request.small_bytes})")
        if not 1 <= request.rounds <= MAX_ROUNDS:
            raise ProbeRefused(bad, f"rounds: {request.rounds}, must lie in [1, {MAX_ROUNDS}]")
        if not 0 < request.timeout_s <= MAX_TIMEOUT_S:
            raise ProbeRefused(bad, f"timeout_s: {request.timeout_s}, must lie in (0, {MAX_TIMEOUT_S:g}] seconds")
        if not self._busy.acquire(blocking=False):
            raise ProbeRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, "a probe is already running on this worker; retry later")
        try:
            channel = open_channel(peer, max_bytes=self.max_bytes, tls_ca=self.tls_ca)
            try:
                fig = measure(pb_grpc.StageServiceStub(channel), self.metadata, small_bytes=request.small_bytes,
                              large_bytes=request.large_bytes, rounds=request.rounds, timeout_s=request.timeout_s,
                              peer=peer)  # fmt: skip
            finally:
                channel.close()
        finally:
            self._busy.release()
        return pb.ProbeReply(peer=peer, rtt_ms=fig.rtt_ms, bandwidth_gbps=fig.bandwidth_gbps, up_gbps=fig.up_gbps,
                             down_gbps=fig.down_gbps, bytes=fig.bytes, rounds=fig.rounds, seconds=fig.seconds,
                             version=PROBE_VERSION)  # fmt: skip
