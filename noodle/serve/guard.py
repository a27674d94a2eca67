"""The HTTP edge's first gate (pure ASGI): refuse a request by its headers before its body is read.

Per request, in this order, before the app sees it:

1. ``Host`` must name this server (``127.0.0.1``, ``localhost``, ``::1``, the ``--host`` it
   listens on, or a name given with ``--allow-host``; any name when it listens on every
   interface) -> 400: a DNS-rebinding page cannot reach a server on 127.0.0.1 under its own name;
2. an ``Origin`` header (browsers send it) must be this server's or one given with
   ``--allow-origin`` -> 403: a foreign page's "simple" cross-origin POST (``text/plain``, no
   preflight) is refused rather than served;
3. the credentials the route needs (``Authorization: Bearer``): ``/v1/*`` the API key,
   ``/noodle/cluster/join``, ``/heartbeat`` and ``/leave`` the cluster token, ``/noodle/cluster`` and
   ``/noodle/cluster/export`` (worker addresses, the model's path) either of them -> 401;
4. ``Content-Length`` against the route's body limit -> 413, nothing read;
5. then the body as it streams: bytes are counted (chunked bodies too) and the request is cut
   at the limit (413), or when the whole body has not arrived within ``body_timeout_s`` (408).
   Either answer closes the connection; the app sees the client leave.

Refusals are OpenAI's error JSON. Nothing here parses a body or touches the engine, so
``/healthz`` and heartbeats keep answering while strangers send megabytes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from noodle.serve.protocol import error_body

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["EdgePolicy", "Guard", "allowed_hosts", "authorized", "LOCAL_HOSTS", "MAX_REQUEST_BYTES", "JOIN_BYTES", "SMALL_BYTES", "BODY_TIMEOUT_S"]

MAX_REQUEST_BYTES = 8 << 20  # /v1/completions and /v1/chat/completions (--max-request-bytes)
JOIN_BYTES = 4 << 20  # a join: one cost row per placement unit (at most 1024 units)
SMALL_BYTES = 64 << 10  # a heartbeat, and anything sent to another route
BODY_TIMEOUT_S = 60.0  # the whole body must arrive within this long
_BODY_ROUTES = ("/v1/completions", "/v1/chat/completions")
_CLUSTER_WRITES = ("/noodle/cluster/join", "/noodle/cluster/heartbeat", "/noodle/cluster/leave")
_CLUSTER_READS = ("/noodle/cluster", "/noodle/cluster/export")
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})


def allowed_hosts(listen_host: str, extra: tuple[str, ...] = ()) -> frozenset[str] | None:
    """The ``Host`` names a server on ``listen_host`` answers to; ``None``: any (it listens everywhere, or ``*``)."""
    names = {listen_host.strip("[]").lower(), *(h.strip().strip("[]").lower() for h in extra)}
    if names & _WILDCARDS:
        return None
    return LOCAL_HOSTS | names


@dataclass(frozen=True)
class EdgePolicy:
    """What the gate enforces: credentials, body limits (bytes) and the body deadline (seconds)."""

    api_key: str | None = None
    cluster_token: str | None = None
    hosts: frozenset[str] | None = LOCAL_HOSTS  # None: any Host
    origins: frozenset[str] = frozenset()  # foreign origins allowed ("*": any)
    max_request_bytes: int = MAX_REQUEST_BYTES
    join_bytes: int = JOIN_BYTES
    small_bytes: int = SMALL_BYTES
    body_timeout_s: float = BODY_TIMEOUT_S

    def body_limit(self, path: str) -> int:
        if path in _BODY_ROUTES:
            return self.max_request_bytes
        return self.join_bytes if path == "/noodle/cluster/join" else self.small_bytes

    def secrets_for(self, path: str) -> tuple[str, ...] | None:
        """The secrets any one of which opens ``path``; ``None``: open."""
        if path.startswith("/v1/") or path == "/v1":
            keys: tuple[str | None, ...] = (self.api_key,)
        elif path in _CLUSTER_WRITES:
            keys = (self.cluster_token,)
        elif path in _CLUSTER_READS:
            keys = (self.api_key, self.cluster_token)
        else:
            return None
        given = tuple(k for k in keys if k)
        return given or None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _hostname(value: str) -> str:
    """``host[:port]`` or ``[v6][:port]`` -> the lower-case host."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def _origin_ok(origin: str, policy: EdgePolicy) -> bool:
    if "*" in policy.origins or origin in policy.origins:
        return True
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme not in ("http", "https"):
        return False  # "null" (sandboxed pages, file://) and the like
    host = _hostname(rest.partition("/")[0])
    return policy.hosts is not None and host in policy.hosts


def authorized(header: str | None, secrets: tuple[str, ...]) -> bool:
    """Does ``Authorization: Bearer X`` carry one of ``secrets``?"""
    scheme, _, key = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = key.strip().encode()
    return any(hmac.compare_digest(given, s.encode()) for s in secrets)  # every secret is compared


async def send_error(send: Send, status: int, message: str, *, code: str, type: str = "invalid_request_error",
                     param: str | None = None, close: bool = False) -> None:  # fmt: skip
    """One OpenAI error JSON response (``Connection: close`` when the rest of the request is left unread)."""
    body = json.dumps(error_body(message, type=type, param=param, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware enforcing an :class:`EdgePolicy` (see the module docstring)."""

    def __init__(self, app: ASGIApp, policy: EdgePolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, pol = scope.get("path", ""), self.policy
        host = _header(scope, b"host")
        if pol.hosts is not None and host is not None and _hostname(host) not in pol.hosts:
            await send_error(send, 400, f"Host: {host[:100]!r} is not a name this server answers to ("
                             f"{', '.join(sorted(pol.hosts))}); start noodle serve with --allow-host NAME to add one",
                             code="invalid_host", close=True)  # fmt: skip
            return
        origin = _header(scope, b"origin")
        if origin is not None and not _origin_ok(origin, pol):
            await send_error(send, 403, f"Origin: {origin[:100]!r} is another site; pages from it may not call this "
                             "server (start noodle serve with --allow-origin ORIGIN to let them)",
                             code="cross_origin", close=True)  # fmt: skip
            return
        if origin is not None and scope.get("method") == "OPTIONS" and _header(scope, b"access-control-request-method"):
            await self.app(scope, receive, send)  # an allowed origin's CORS preflight: no credentials in it
            return
        secrets = pol.secrets_for(path)
        if secrets is not None and not authorized(_header(scope, b"authorization"), secrets):
            what = "cluster token (the --token of noodle serve)" if path in _CLUSTER_WRITES else "API key"
            if path in _CLUSTER_READS:
                what = "API key or the cluster token"
            await send_error(send, 401, f"missing or wrong credentials: send Authorization: Bearer <{what}>",
                             code="invalid_api_key", close=True)  # fmt: skip
            return
        limit = pol.body_limit(path)
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                await send_error(send, 400, f"Content-Length: {length[:40]!r} is not a byte count",
                                 code="invalid_value", close=True)  # fmt: skip
                return
            if declared > limit:
                await send_error(send, 413, _too_large(path, limit, f"declares {declared} bytes"),
                                 code="request_too_large", close=True)  # fmt: skip
                return
        await _Body(self.app, pol, limit, path).run(scope, receive, send)


def _too_large(path: str, limit: int, what: str) -> str:
    hint = "; raise --max-request-bytes to allow more" if path in _BODY_ROUTES else ""
    return f"body: {path} takes at most {limit} bytes, this request {what}{hint}"


class _Body:
    """One request's body, counted as it streams; cut at the limit or the deadline."""

    def __init__(self, app: ASGIApp, policy: EdgePolicy, limit: int, path: str) -> None:
        self.app, self.policy, self.limit, self.path = app, policy, limit, path
        self.seen = 0
        self.complete = False
        self.refused = False
        self.started = False
        self.deadline: float | None = None

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def guarded_send(message: Message) -> None:
            if self.refused:
                return  # the gate answered already; the app's late reply goes nowhere
            if message["type"] == "http.response.start":
                self.started = True
            await send(message)

        async def guarded_receive() -> Message:
            if self.refused:
                return {"type": "http.disconnect"}
            if self.complete:
                return await receive()  # after the body: waits for the client to leave
            return await self._next(receive, send)

        await self.app(scope, guarded_receive, guarded_send)

    async def _next(self, receive: Receive, send: Send) -> Message:
        loop = asyncio.get_running_loop()
        if self.deadline is None:
            self.deadline = loop.time() + self.policy.body_timeout_s
        try:
            message = await asyncio.wait_for(receive(), timeout=max(0.0, self.deadline - loop.time()))
        except asyncio.TimeoutError:
            return await self._refuse(send, 408, f"body: not received within {self.policy.body_timeout_s:g} s "
                                                 f"({self.seen} bytes arrived)", "request_timeout")  # fmt: skip
        if message["type"] != "http.request":
            return message
        self.seen += len(message.get("body", b""))
        if self.seen > self.limit:
            return await self._refuse(send, 413, _too_large(self.path, self.limit, f"sent more than {self.limit}"),
                                      "request_too_large")  # fmt: skip
        if not message.get("more_body", False):
            self.complete = True
        return message

    async def _refuse(self, send: Send, status: int, message: str, code: str) -> Message:
        if not self.started:
            await send_error(send, status, message, code=code, close=True)
        self.refused = True
        return {"type": "http.disconnect"}

