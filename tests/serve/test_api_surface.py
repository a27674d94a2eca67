"""What clients probe besides completions: /health, model cards, X-Request-Id, usage details, /v1/responses."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from .conftest import API_KEY
from .servers import ServeProc

MODEL = "gpt2-tiny"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CONTEXT = 256  # gpt2-tiny's n_positions


def client(server: ServeProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_health_is_200_when_ready_without_credentials(server: ServeProc) -> None:
    r = httpx.get(f"{server.base}/health", timeout=10)
    assert r.status_code == 200 and r.json()["ready"] is True and r.json()["state"] == "ready"


def test_model_card_has_the_context_and_unknown_ids_are_404(server: ServeProc) -> None:
    card = client(server).models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra == {"max_model_len": CONTEXT, "context_length": CONTEXT}
    with pytest.raises(openai.NotFoundError) as err:
        client(server).models.retrieve("no-such-model")
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found" and body["param"] == "model"
    assert "'no-such-model' is not served here" in body["message"] and MODEL in body["message"]


def test_request_id_is_echoed_named_in_the_id_and_logged(server: ServeProc) -> None:
    c = client(server)
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        extra_headers={"X-Request-Id": "trace-42.abc"},
    )  # fmt: skip
    assert raw.headers["x-request-id"] == "trace-42.abc"
    assert raw.parse().id == "chatcmpl-trace-42.abc"
    with c.completions.with_streaming_response.create(model=MODEL, prompt="x", max_tokens=2, stream=True,
                                                      extra_headers={"X-Request-Id": "stream-7"}) as resp:  # fmt: skip
        assert resp.headers["x-request-id"] == "stream-7"
        assert all(ch.id == "cmpl-stream-7" for ch in resp.parse())
    assert re.search(r"request trace-42\.abc: (stop|length) after [\d.]+ s, \d+ prompt \+ \d+ completion", server.log())
    assert "request stream-7: " in server.log()


def test_request_id_is_made_when_absent_and_refused_when_malformed(server: ServeProc) -> None:
    r = httpx.post(f"{server.base}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                   headers=AUTH, timeout=30)  # fmt: skip
    rid = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid) and r.json()["id"] == f"cmpl-{rid}"
    assert re.fullmatch(r"[0-9a-f]{32}", httpx.get(f"{server.base}/nowhere", timeout=10).headers["x-request-id"])
    for bad in ("has space", "x" * 257):
        r = httpx.get(f"{server.base}/v1/models", headers={**AUTH, "X-Request-Id": bad}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id", bad
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_max_completion_tokens_wins_over_max_tokens(server: ServeProc) -> None:
    res = client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=10, max_completion_tokens=2, temperature=0)  # fmt: skip
    assert 1 <= res.usage.completion_tokens <= 2
    assert res.choices[0].finish_reason == "length" or res.usage.completion_tokens < 2
    with pytest.raises(openai.BadRequestError) as err:
        client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                               max_completion_tokens=CONTEXT)  # fmt: skip
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "max_completion_tokens"
    assert err.value.body["code"] == "context_length_exceeded"


def test_usage_has_prompt_tokens_details(server: ServeProc) -> None:
    c = client(server)
    res = c.completions.create(model=MODEL, prompt="Hello there", max_tokens=2)
    assert res.usage.prompt_tokens_details is not None and res.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0


def test_responses_api_is_a_clear_404(server: ServeProc) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(server).responses.create(model=MODEL, input="Hi")
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "unsupported_endpoint"
    assert "/v1/chat/completions" in err.value.body["message"]
    r = httpx.get(f"{server.base}/v1/responses/resp_123", headers=AUTH, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unsupported_endpoint"
