"""Every error status of the API, as OpenAI's error JSON, from real requests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from noodle.plandoc import PlanDoc

from .conftest import API_KEY
from .servers import ServeProc, app_server, slow_plan

MODEL = "gpt2-tiny"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def assert_error(r: httpx.Response, status: int, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def post(server: ServeProc, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{server.base}{path}", json=body, headers=AUTH if headers is None else headers, timeout=60)


def test_401_without_or_with_a_wrong_key(server: ServeProc) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert_error(post(server, "/v1/completions", body, headers={}), 401, code="invalid_api_key")
    assert_error(post(server, "/v1/completions", body, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(post(server, "/v1/completions", body, headers={"Authorization": API_KEY}), 401)  # no Bearer
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.base}/healthz").status_code == 200  # monitoring stays open


def test_404_unknown_model_and_route(server: ServeProc) -> None:
    err = assert_error(post(server, "/v1/completions", {"model": "gpt-4", "prompt": "hi"}), 404, param="model",
                       code="model_not_found")  # fmt: skip
    assert "gpt2-tiny" in err["message"]
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0).chat.completions.create(
            model="other", messages=[{"role": "user", "content": "x"}])  # fmt: skip
    assert_error(httpx.get(f"{server.base}/v1/nothing-here", headers=AUTH), 404)
    assert_error(httpx.get(f"{server.base}/v1/models/other", headers=AUTH), 404, param="model")
    assert_error(httpx.get(f"{server.base}/v1/completions", headers=AUTH), 405)


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2}, "n"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "3"}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 3}, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 99999]}, "prompt"),
        ("/v1/completions", {"model": MODEL}, "prompt"),
        ("/v1/completions", {"prompt": "hi"}, "model"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
    ],
)
def test_400_names_the_field(server: ServeProc, path: str, body: dict[str, Any], param: str) -> None:
    err = assert_error(post(server, path, body), 400, param=param)
    assert err["type"] == "invalid_request_error"
    assert err["message"].startswith(param)


def test_400_invalid_json(server: ServeProc) -> None:
    r = httpx.post(f"{server.base}/v1/completions", content=b'{"model": ', headers=AUTH)
    assert_error(r, 400, code="invalid_json")


def test_400_context_length_exceeded(server: ServeProc) -> None:
    long_prompt = [7] * 300  # the model has 256 positions
    assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": long_prompt}), 400, param="prompt",
                 code="context_length_exceeded")  # fmt: skip
    err = assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": [7] * 200, "max_tokens": 100}), 400,
                       param="max_tokens", code="context_length_exceeded")  # fmt: skip
    assert "256" in err["message"] and "200" in err["message"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**9}
    assert_error(post(server, "/v1/chat/completions", chat), 400, param="max_completion_tokens",
                 code="context_length_exceeded")  # fmt: skip
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0).completions.create(
            model=MODEL, prompt=long_prompt)  # fmt: skip


# -- statuses that need their own server: no chat template, a full queue, a timeout, a drain ----------
@pytest.fixture()
def make_server(model_dir: Path, plan_doc: PlanDoc) -> Iterator[Any]:
    """Start the app in a uvicorn thread (real engine) with a plan of slow emulated steps."""
    from transformers import AutoTokenizer

    from noodle.serve.build import build_server

    started: list[Any] = []

    def make(step_ms: float = 40.0, **kwargs: Any) -> tuple[Any, str]:
        tok = AutoTokenizer.from_pretrained(model_dir)
        served = build_server(model_dir, slow_plan(plan_doc, step_ms), tok, emulate=True, **kwargs)
        cm = app_server(served)
        base = cm.__enter__()
        started.append(cm)
        return served, base

    yield make
    for cm in started:
        cm.__exit__(None, None, None)


def test_400_chat_without_a_template(make_server: Any) -> None:
    _, base = make_server()
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    err = assert_error(r, 400, param="messages", code="no_chat_template")
    assert "--chat-template" in err["message"]


def test_429_with_retry_after_when_the_queue_is_full(make_server: Any) -> None:
    served, base = make_server(concurrency=1, max_queue=1)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 30, "temperature": 0}
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(httpx.post(f"{base}/v1/completions", json=body,
                                                                         timeout=60).status_code)) for _ in range(2)]  # fmt: skip
    for t in threads:
        t.start()
        time.sleep(0.3)  # first: generating, second: waiting in the queue of one
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    err = assert_error(r, 429, code="queue_full")
    assert int(r.headers["retry-after"]) >= 1 and err["type"] == "rate_limit_exceeded"
    for t in threads:
        t.join(timeout=60)
    assert results == [200, 200]


def test_504_and_stream_error_on_request_timeout(make_server: Any) -> None:
    served, base = make_server(request_timeout_s=0.5)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 60}
    assert_error(httpx.post(f"{base}/v1/completions", json=body, timeout=60), 504, code="request_timeout")
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "timeout"
    deadline = time.monotonic() + 5
    while served.runtime.stats().in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.runtime.stats().in_flight == 0  # the timed-out sequences were cancelled


def test_503_while_draining(make_server: Any) -> None:
    served, base = make_server(drain_timeout_s=20.0)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 15, "temperature": 0}
    lines: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            lines.extend(line for line in r.iter_lines() if line)

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.3)
    served.begin_drain()
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=10)
    assert_error(r, 503, code="shutting_down")
    assert "retry-after" in r.headers
    assert httpx.get(f"{base}/readyz").status_code == 503
    t.join(timeout=30)
    assert lines[-1] == "data: [DONE]"  # the in-flight request finished
    finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
    assert finishes[-1] == "length"


def test_served_model_name_replaces_the_folder_name(make_server: Any) -> None:
    _, base = make_server(model_id="house-model")
    assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]] == ["house-model"]
    r = httpx.post(f"{base}/v1/completions", json={"model": "house-model", "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "house-model"
    assert_error(httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi"}), 404, param="model")
