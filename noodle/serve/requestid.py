"""``X-Request-Id``: taken from the request (or made), echoed on the response, named in the logs.

A client's id (1 to 256 visible ASCII characters) names its request in the response header, in
the completion's ``id`` (``chatcmpl-<id>``, as vLLM does) and in the server's log lines; a request
without one gets a fresh ``uuid4().hex``. Any other value is refused with a 400 naming the header.
Pure ASGI (streaming-safe), outermost, so every response carries the header, errors included.
"""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from noodle.serve.guard import send_error

__all__ = ["RequestId", "request_id_of", "HEADER", "MAX_ID_CHARS"]

HEADER = "x-request-id"
MAX_ID_CHARS = 256
_VALID = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_ID_CHARS)


def request_id_of(scope: Scope) -> str:
    """The id :class:`RequestId` gave this request (a fresh one outside the middleware, e.g. in unit tests)."""
    return str(scope.get("state", {}).get("request_id") or uuid.uuid4().hex)


class RequestId:
    """Reads or makes the request's id, keeps it in ``scope["state"]["request_id"]``, echoes it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = [v for k, v in scope.get("headers", ()) if k.lower() == HEADER.encode()]
        value = raw[0].decode("latin-1") if raw else None
        rid = value if value is not None and _VALID.fullmatch(value) else uuid.uuid4().hex
        echo = [(HEADER.encode(), rid.encode())]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *echo]}
            await send(message)

        if value is not None and rid != value:
            await send_error(send_with_id, 400, f"X-Request-Id: {value[:40]!r} ({len(value)} characters) is not an id; "
                             f"send 1 to {MAX_ID_CHARS} visible ASCII characters, or leave it out",
                             code="invalid_value", param="X-Request-Id", close=True)  # fmt: skip
            return
        scope.setdefault("state", {})["request_id"] = rid
        await self.app(scope, receive, send_with_id)
