"""Connection limits of ``noodle serve``: descriptors, connections, header and keep-alive timeouts.

uvicorn closes a connection that stays quiet ``timeout_keep_alive`` seconds *after a response*,
but never one that opened and sends nothing, or sends its headers a byte at a time. So:

* at start the soft ``RLIMIT_NOFILE`` is raised to the hard limit (1,024 is a common soft
  default; 1,100 idle sockets would exhaust it);
* at most ``max_connections`` connections are held, cut to what the descriptor limit leaves after
  :data:`RESERVED_FDS` for the model's files, gRPC channels and the like; a connection past that
  closes the one that has waited longest without a request in progress (an idle or slow-header
  client), so idle sockets cannot lock a real client out; when every connection is busy,
  uvicorn's ``limit_concurrency`` answers 503;
* a request's headers must be complete within ``header_timeout_s`` of the connection opening
  (or of its previous response), however slowly they trickle in;
* keep-alive connections close after :data:`KEEP_ALIVE_S` quiet seconds, and headers are limited
  to :data:`MAX_HEADER_BYTES` (h11's incomplete-event size). Bodies are the Guard's
  (:mod:`noodle.serve.guard`: per-route size, 60 s to arrive).

Where the hard limit is low too, a burst of connections can still run the process out of
descriptors between accepting sockets and closing idle ones: asyncio then pauses accepting for a
second; :func:`quiet_accept_errors` makes that one warning line per 10 s instead of a traceback
each time.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import Any

__all__ = ["MAX_CONNECTIONS", "HEADER_TIMEOUT_S", "KEEP_ALIVE_S", "MAX_HEADER_BYTES", "RESERVED_FDS",
           "raise_nofile", "connection_budget", "uvicorn_config", "quiet_accept_errors"]  # fmt: skip

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 4096  # --max-connections
HEADER_TIMEOUT_S = 10.0  # --header-timeout
KEEP_ALIVE_S = 5
MAX_HEADER_BYTES = 64 << 10
RESERVED_FDS = 256


def raise_nofile() -> int:
    """Raise this process's soft descriptor limit to its hard limit; returns the soft limit now in force."""
    try:
        import resource
    except ImportError:  # Windows: no rlimits; the C runtime's limit applies
        return MAX_CONNECTIONS + RESERVED_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d (%s)", soft, target, exc)
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def connection_budget(requested: int, nofile: int) -> int:
    """Connections to hold: ``requested``, cut to the descriptors left after :data:`RESERVED_FDS`."""
    return max(16, min(requested, nofile - RESERVED_FDS))


_OUT_OF = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, every_s: float = 10.0) -> None:
    """Log running out of descriptors while accepting as one line per ``every_s``, not a traceback per try."""
    last = [-every_s]
    previous = loop.get_exception_handler()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _OUT_OF and "accept" in str(context.get("message", "")):
            now = time.monotonic()
            if now - last[0] >= every_s:
                last[0] = now
                log.warning("out of open files accepting connections (%s); pausing accepts for a second while idle "
                            "connections are closed: raise the hard limit (ulimit -Hn) or lower --max-connections",
                            exc.strerror)  # fmt: skip
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)


def _guarded_h11(max_connections: int, header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a header deadline and idle eviction (see the module docstring)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _header_timer: Any = None
        _idle_since: float = 0.0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._await_headers()
            if len(self.connections) > max_connections:
                self._evict_one()

        def _idle(self) -> bool:
            return (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing()

        def _await_headers(self) -> None:
            self._idle_since = self.loop.time()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _stop_waiting(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self._idle():
                log.debug("closing %s: no complete request headers within %g s", self.client, header_timeout_s)
                self.transport.close()

        def _evict_one(self) -> None:
            idle = [c for c in self.connections if c is not self and isinstance(c, GuardedH11) and c._idle()]
            if idle:
                oldest = min(idle, key=lambda c: c._idle_since)
                log.debug("%d connections: closing the longest idle one (%s)", len(self.connections), oldest.client)
                oldest._stop_waiting()
                oldest.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._stop_waiting()  # a request is in progress: its body is the Guard's to time

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._stop_waiting()
                self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

    return GuardedH11


def uvicorn_config(app: Any, *, max_connections: int = MAX_CONNECTIONS,
                   header_timeout_s: float = HEADER_TIMEOUT_S) -> Any:  # fmt: skip
    """The ``uvicorn.Config`` ``noodle serve`` runs with (call :func:`raise_nofile` first)."""
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5,
                          timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=max_connections + 1,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          http=_guarded_h11(max_connections, header_timeout_s))  # fmt: skip
