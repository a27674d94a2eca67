"""Malformed, mistyped and huge request bodies: always a 4xx error JSON, never a 500 or a traceback."""

from __future__ import annotations

import json
import random
from typing import Any

import httpx

from .conftest import API_KEY
from .servers import ServeProc

MODEL = "gpt2-tiny"
VALID_COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0}
VALID_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
WEIRD_VALUES: list[Any] = [
    None, True, -1, 0, 10**40, -(10**40), 1e308, -1e308, 3.5, "", "x" * 5000, [], [None], {}, {"a": 1},
    [[1, 2]], ["a", 1], [-5], [2**70], "NaN",
]  # fmt: skip
RAW_BODIES = [
    b"", b"{", b"}", b"[]", b"null", b"42", b'"text"', b"{'model': 'x'}", b'{"model": "gpt2-tiny",}',
    b"\xff\xfe\x00garbage", b'{"model": "gpt2-tiny", "prompt": "hi"', b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 5000 + b"1" + b"}" * 5000, b'{"model": NaN}', b'{"max_tokens": Infinity}',
    json.dumps({"model": MODEL, "prompt": "\ud800"}).encode(), json.dumps({"model": "\ud800", "prompt": "x"}).encode(),
    json.dumps({**VALID_COMPLETION, "stop": "\udfff"}).encode(), b"\x00" * 64,
    json.dumps({**VALID_CHAT, "messages": [{"role": "user", "content": "\ud800"}]}).encode(),
]  # fmt: skip


def _bodies() -> list[tuple[str, bytes]]:
    """Deterministic bodies: raw junk, then every field of both endpoints set to every weird value."""
    out: list[tuple[str, bytes]] = [(p, raw) for raw in RAW_BODIES for p in ("/v1/completions", "/v1/chat/completions")]
    rng = random.Random(0)
    for path, valid, fields in (
        ("/v1/completions", VALID_COMPLETION, ["model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop",
                                               "n", "stream", "stream_options", "logprobs", "echo"]),
        ("/v1/chat/completions", VALID_CHAT, ["model", "messages", "max_completion_tokens", "temperature", "stop",
                                              "stream", "stream_options", "presence_penalty", "n"]),
    ):  # fmt: skip
        for field in fields:
            for value in rng.sample(WEIRD_VALUES, 8):
                out.append((path, json.dumps({**valid, field: value}).encode()))
    for value in WEIRD_VALUES:  # inside a chat message
        out.append(("/v1/chat/completions", json.dumps({**VALID_CHAT, "messages": [{"role": "user", "content": value}]}).encode()))
        out.append(("/v1/chat/completions", json.dumps({**VALID_CHAT, "messages": [value]}).encode()))
    return out


def test_fuzzed_bodies_never_500(server: ServeProc) -> None:
    bodies = _bodies()
    assert len(bodies) >= 100
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        for path, body in bodies:
            r = c.post(path, content=body, headers={"Content-Type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (path, body[:200], r.text)
            if r.status_code != 200:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}, r.text
                assert "Traceback" not in r.text
            elif b'"stream": true' not in body:
                assert "choices" in r.json()
    assert statuses.get(400, 0) >= 80  # most of them are invalid requests
    assert httpx.get(f"{server.base}/readyz").status_code == 200  # and the server is still serving
