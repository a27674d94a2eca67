"""The HTTP edge's first gate (pure ASGI): refuse a request by its headers before its body is read.

Per request, in this order, before the app sees it:

1. the credentials the route needs (``Authorization: Bearer``): ``/v1/*`` the API key,
   ``/noodle/cluster/join`` and ``/heartbeat`` the cluster token -> 401;
2. ``Content-Length`` against the route's body limit -> 413, nothing read;
3. then the body as it streams: bytes are counted (chunked bodies too) and the request is cut
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
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from noodle.serve.protocol import error_body

__all__ = ["EdgePolicy", "Guard", "MAX_REQUEST_BYTES", "JOIN_BYTES", "SMALL_BYTES", "BODY_TIMEOUT_S"]

MAX_REQUEST_BYTES = 8 << 20  # /v1/completions and /v1/chat/completions (--max-request-bytes)
JOIN_BYTES = 4 << 20  # a join: one cost row per placement unit (at most 1024 units)
SMALL_BYTES = 64 << 10  # a heartbeat, and anything sent to another route
BODY_TIMEOUT_S = 60.0  # the whole body must arrive within this long
_BODY_ROUTES = ("/v1/completions", "/v1/chat/completions")
_CLUSTER_WRITES = ("/noodle/cluster/join", "/noodle/cluster/heartbeat")


@dataclass(frozen=True)
class EdgePolicy:
    """What the gate enforces: credentials, body limits (bytes) and the body deadline (seconds)."""

    api_key: str | None = None
    cluster_token: str | None = None
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
        else:
            return None
        given = tuple(k for k in keys if k)
        return given or None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _authorized(header: str | None, secrets: tuple[str, ...]) -> bool:
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
        secrets = pol.secrets_for(path)
        if secrets is not None and not _authorized(_header(scope, b"authorization"), secrets):
            what = "cluster token (the --token of noodle serve)" if path in _CLUSTER_WRITES else "API key"
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

