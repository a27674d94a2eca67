"""Who may call a worker, how many calls at once and for how long, decided before a body is read.

:class:`CallGate` is the worker's one server interceptor. For every call it:

1. refuses a missing or wrong ``authorization: Bearer <token>`` with ``UNAUTHENTICATED`` from the
   call's metadata alone. The refusal is a request-streaming handler that aborts at once, so gRPC
   neither reads nor waits for the request body (a refused caller holds no thread and no memory);
2. serves ``Health`` outside the caps below, so a health check answers while every slot is taken;
3. caps the calls in progress: ``max_calls`` in all and ``max_calls_per_peer`` per caller address
   (``RESOURCE_EXHAUSTED`` beyond), so one caller cannot take every slot;
4. bounds time: a unary call's request must arrive within ``body_timeout_s``, and a stream that sends
   nothing for ``stream_idle_s`` is closed (the caller sees ``CANCELLED``; coordinators open a new
   stream and keep their sessions, which live apart from streams);
5. answers ``INVALID_ARGUMENT`` to a message that is not valid protobuf (gRPC's own handling left a
   stream's handler waiting forever, which kept a worker from stopping).

Every handler is served as a request-streaming one: that is what lets the gate act before the
first message arrives (gRPC calls a unary handler only once the whole body is in memory).
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = ["CallLimits", "CallGate", "EXEMPT_METHODS"]

log = logging.getLogger(__name__)

EXEMPT_METHODS = frozenset({"Health"})
_UNDECODABLE = object()


@dataclass(frozen=True)
class CallLimits:
    """The gate's caps; see the module docstring."""

    max_calls: int
    max_calls_per_peer: int
    body_timeout_s: float
    stream_idle_s: float


class _Watched:
    """One call the timer may cancel: armed while waiting on the caller, disarmed while computing."""

    __slots__ = ("context", "deadline", "expired")

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.deadline = 0.0
        self.expired = False


class _Timer:
    """One thread that cancels watched calls whose deadline passed."""

    def __init__(self, tick_s: float) -> None:
        self._calls: set[_Watched] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._tick = tick_s
        self._thread = threading.Thread(target=self._loop, name="noodle-call-timer", daemon=True)
        self._thread.start()

    def add(self, call: _Watched) -> None:
        with self._lock:
            self._calls.add(call)

    def discard(self, call: _Watched) -> None:
        with self._lock:
            self._calls.discard(call)

    def _loop(self) -> None:
        while not self._stop.wait(self._tick):
            now = time.monotonic()
            with self._lock:
                late = [c for c in self._calls if 0 < c.deadline < now]
            for c in late:
                c.expired = True
                c.context.cancel()

    def close(self) -> None:
        self._stop.set()


def _peer_key(peer: str) -> str:
    """``ipv4:10.0.0.2:51234`` -> ``ipv4:10.0.0.2``: one key per caller address, whatever its port."""
    scheme, _, rest = peer.partition(":")
    if scheme in ("ipv4", "ipv6") and ":" in rest:
        return f"{scheme}:{rest.rpartition(':')[0]}"
    return peer


def _tolerant(decode: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if decode is None:
        return None

    def run(raw: bytes) -> Any:
        try:
            return decode(raw)
        except Exception:  # noqa: BLE001 - any decode failure is the caller's bad message
            return _UNDECODABLE

    return run


class CallGate(grpc.ServerInterceptor):
    """Token check, call caps and time bounds for every call (see the module docstring).

    Args:
        token: the shared token, or ``None`` to let every caller in (loopback or ``--insecure``).
        limits: the caps.
    """

    def __init__(self, token: str | None, limits: CallLimits) -> None:
        self._want = f"Bearer {token}".encode() if token else None
        self.limits = limits
        self._lock = threading.Lock()
        self._total = 0
        self._per_peer: dict[str, int] = {}
        self.refused_unauthenticated = 0
        tick = min(max(min(limits.body_timeout_s, limits.stream_idle_s) / 8, 0.02), 0.5)
        self._timer = _Timer(tick)

    def close(self) -> None:
        self._timer.close()

    def in_progress(self) -> int:
        """Calls holding a slot now (Health aside)."""
        with self._lock:
            return self._total

    # -- the interceptor -------------------------------------------------------------------------
    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        if self._want is not None:
            got = dict(details.invocation_metadata or ()).get("authorization", "")
            got_b = got.encode() if isinstance(got, str) else bytes(got)
            if not hmac.compare_digest(got_b, self._want):
                with self._lock:
                    self.refused_unauthenticated += 1
                return _deny(handler)
        method = details.method.rpartition("/")[2]
        return self._wrap(handler, method)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        exempt = method in EXEMPT_METHODS
        decode = _tolerant(handler.request_deserializer)
        encode = handler.response_serializer

        if handler.request_streaming:
            inner = handler.stream_stream if handler.response_streaming else handler.stream_unary

            def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                if not exempt:
                    self._take_slot(context)
                return inner(self._stream_of(requests, context, method), context)

        else:
            inner = handler.unary_stream if handler.response_streaming else handler.unary_unary

            def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                if not exempt:
                    self._take_slot(context)
                return inner(self._first_of(requests, context, method), context)

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(call, request_deserializer=decode, response_serializer=encode)
        return grpc.stream_unary_rpc_method_handler(call, request_deserializer=decode, response_serializer=encode)

    # -- caps ------------------------------------------------------------------------------------
    def _take_slot(self, context: grpc.ServicerContext) -> None:
        peer = _peer_key(context.peer())
        lim = self.limits
        with self._lock:
            mine = self._per_peer.get(peer, 0)
            if self._total >= lim.max_calls:
                why = f"this worker has {self._total} calls in progress, its limit; retry later"
            elif mine >= lim.max_calls_per_peer:
                why = f"{peer} has {mine} calls in progress, the per-caller limit; close idle streams or retry later"
            else:
                why = ""
                self._total += 1
                self._per_peer[peer] = mine + 1
        if why:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._lock:
                self._total -= 1
                left = self._per_peer.get(peer, 1) - 1
                if left:
                    self._per_peer[peer] = left
                else:
                    self._per_peer.pop(peer, None)

        if not context.add_callback(release):  # the call already ended
            release()

    # -- time bounds -----------------------------------------------------------------------------
    def _first_of(self, requests: Iterator[Any], context: grpc.ServicerContext, method: str) -> Any:
        """The one request of a unary call, within ``body_timeout_s``."""
        watched = _Watched(context)
        watched.deadline = time.monotonic() + self.limits.body_timeout_s
        self._timer.add(watched)
        try:
            request = next(requests, None)
        except grpc.RpcError:
            request = None
        finally:
            self._timer.discard(watched)
        if watched.expired:
            log.warning("%s from %s: no request within %g s; call cancelled", method, context.peer(), self.limits.body_timeout_s)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"request: none within {self.limits.body_timeout_s:g} s")
        if request is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: the call carried no message")
        if request is _UNDECODABLE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {method} message (protobuf decode failed)")
        return request

    def _stream_of(self, requests: Iterator[Any], context: grpc.ServicerContext, method: str) -> Iterator[Any]:
        """A stream's requests; the stream ends when the caller is idle for ``stream_idle_s``."""
        watched = _Watched(context)
        idle = self.limits.stream_idle_s
        self._timer.add(watched)
        try:
            while True:
                watched.deadline = time.monotonic() + idle
                try:
                    request = next(requests)
                except (StopIteration, grpc.RpcError):
                    if watched.expired:
                        log.info("%s from %s: idle for %g s; stream closed", method, context.peer(), idle)
                    return
                finally:
                    watched.deadline = 0.0  # computing a reply is not idling
                if request is _UNDECODABLE:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {method} message (protobuf decode failed)")
                yield request
        finally:
            self._timer.discard(watched)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A refusal that never reads the request: request-streaming, aborting before the first message."""

    def deny(_requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token (authorization: Bearer <token>)")

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    return grpc.stream_unary_rpc_method_handler(deny)
