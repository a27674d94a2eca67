"""Structured output and tool calling through the ``openai`` client against a real one-stage ``noodle serve``.

The model and schemas are :mod:`tests.serve.grammar_model`'s; ``test_grammar_pipeline`` serves the
same requests through a three-stage plan.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from noodle.plandoc import dump_plan

from .conftest import API_KEY
from .grammar_model import MODEL, PERSON, TIME, USER, WEATHER, json_model, schema_format
from .servers import ServeProc, start_serve

pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def json_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProc]:
    from noodle.serve.planning import plan_this_machine

    root = tmp_path_factory.mktemp("json-serve")
    model = json_model(model_dir, root)
    doc, _ = plan_this_machine(model, concurrency=8)
    (root / "plan.json").write_text(dump_plan(doc))
    args = ["--model", str(model), "--plan", str(root / "plan.json"), "--api-key", API_KEY,
            "--chat-template", str(root / "chat.jinja"), "--concurrency", "8"]  # fmt: skip
    with start_serve(args) as sp:
        yield sp


def client(server: ServeProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_parses_and_validates(json_server: ServeProc, temperature: float) -> None:
    res = client(json_server).chat.completions.create(model=MODEL, messages=USER, max_tokens=120, seed=3,
                                                      temperature=temperature, response_format=schema_format(PERSON))  # fmt: skip
    assert res.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(res.choices[0].message.content or ""), PERSON)


def test_json_schema_streamed_and_beside_free_requests(json_server: ServeProc) -> None:
    c = client(json_server)

    def constrained(seed: int) -> str:
        chunks = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=120, seed=seed, temperature=1.0,
                                           response_format=schema_format(PERSON), stream=True)  # fmt: skip
        return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

    def free(seed: int) -> str:
        res = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=40, seed=seed, temperature=1.0)
        return res.choices[0].message.content or ""

    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # constrained and free requests share the batch
        texts = list(pool.map(constrained, range(3)))
        frees = list(pool.map(free, range(3)))
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert any(not f.lstrip().startswith("{") for f in frees)  # the free ones were not constrained


def test_invalid_schema_is_a_400_naming_the_field(json_server: ServeProc) -> None:
    c = client(json_server)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, messages=USER, response_format=schema_format({"type": "banana"}))
    assert "response_format.json_schema.schema" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_schema"})  # type: ignore[typeddict-item]
    assert "response_format.json_schema" in err.value.message
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, messages=USER, tools=[bad_tool])  # type: ignore[list-item]
    assert "tools[0].function.parameters" in err.value.message


def test_bad_tool_requests_are_400s(json_server: ServeProc) -> None:
    url = f"{json_server.base}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    many = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(10_000)]
    cases = [({"tools": many}, "tools"), ({"tools": [WEATHER], "tool_choice": {"type": "function",
              "function": {"name": "nope"}}}, "tool_choice"), ({"tool_choice": "required"}, "tool_choice"),
             ({"messages": [*USER, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]}, "messages[1]")]  # fmt: skip
    for extra, field in cases:
        r = httpx.post(url, json={"model": MODEL, "messages": USER, **extra}, headers=headers, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"].startswith(field), r.text


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_call_round_trip(json_server: ServeProc, choice: Any) -> None:
    c = client(json_server)
    res = c.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, TIME], tool_choice=choice,
                                    max_tokens=80, temperature=1.0, seed=5)  # fmt: skip
    msg = res.choices[0].message
    assert res.choices[0].finish_reason == "tool_calls" and msg.tool_calls and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    if isinstance(choice, dict):
        assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    back = [*USER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "21 C"}]  # fmt: skip
    res2 = c.chat.completions.create(model=MODEL, messages=back, tools=[WEATHER, TIME], max_tokens=8)
    assert res2.choices[0].finish_reason in ("stop", "length") and res2.usage is not None
    assert res2.usage.prompt_tokens > res.usage.prompt_tokens if res.usage else False


def test_streamed_tool_calls_reassemble(json_server: ServeProc) -> None:
    c = client(json_server)
    with c.chat.completions.stream(model=MODEL, messages=USER, tools=[WEATHER], tool_choice="required",  # type: ignore[list-item]
                                   max_tokens=80, temperature=1.0, seed=7) as stream:  # fmt: skip
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_tool_choice_none_answers_in_text(json_server: ServeProc) -> None:
    res = client(json_server).chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], tool_choice="none",
                                                      max_tokens=8)  # fmt: skip
    assert res.choices[0].message.tool_calls is None and res.choices[0].finish_reason in ("stop", "length")


LONG = {"type": "object", "properties": {"s": {"type": "string", "minLength": 500}}, "required": ["s"]}
# shortest reply 48 characters: 6 tokens of at most 8 bytes (the tokenizer's longest entry that is not EOS)
ROOMY = {"type": "object", "properties": {"s": {"type": "string", "minLength": 40}}, "required": ["s"]}


def test_a_reply_that_cannot_fit_max_tokens_is_a_400_naming_it(json_server: ServeProc) -> None:
    c = client(json_server)
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model=MODEL, messages=USER, response_format=schema_format(LONG), **{field: 5})
        msg = err.value.message
        assert f"- {field}: 5 tokens" in msg and (f"{field}: 5 tokens cannot hold any reply that response_format.json_schema.schema "
                              "allows: its shortest JSON is 508 characters, at least 64 tokens") in msg, msg  # fmt: skip
    tool = {"type": "function", "function": {"name": "essay", "parameters": LONG}}
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, messages=USER, tools=[tool], tool_choice="required", max_tokens=20)  # type: ignore[list-item]
    assert "- max_tokens: 20 tokens cannot hold any reply that tool_choice allows" in err.value.message
    res = c.chat.completions.create(model=MODEL, messages=USER, response_format=schema_format(ROOMY), max_tokens=6)
    assert res.choices[0].finish_reason == "length"  # 6 tokens may hold it: not refused, but runs out


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_reply_cut_by_max_tokens_says_length_and_is_not_claimed_complete(json_server: ServeProc, stream: bool) -> None:
    c = client(json_server)
    kw: dict[str, Any] = dict(model=MODEL, messages=USER, max_tokens=10, temperature=0.0)
    tool = {"type": "function", "function": {"name": "essay", "parameters": ROOMY}}
    for extra in ({"response_format": schema_format(ROOMY)}, {"tools": [tool], "tool_choice": "required"}):
        if stream:  # the client's stream helper refuses to parse a reply cut by length, and says why
            with pytest.raises(openai.LengthFinishReasonError) as cut, c.chat.completions.stream(**kw, **extra) as s:
                s.get_final_completion()
            res = cut.value.completion
        else:
            res = c.chat.completions.create(**kw, **extra)
        choice = res.choices[0]
        assert choice.finish_reason == "length" and not choice.message.tool_calls, choice
        text = choice.message.content or ""
        assert text.startswith('{"') and len(text) < 48
        with pytest.raises(ValueError):
            json.loads(text)
        if not stream:
            assert res.usage is not None and res.usage.completion_tokens == 10


JUNK: list[Any] = [None, True, -1, 0, 3.5, "", "x" * 300, [], [None], {}, {"a": 1}, {"type": "banana"},
                   {"type": "object", "properties": 3}, {"$ref": "#/nowhere"}, {"type": "string", "pattern": "("},
                   {"minLength": -1}, {"enum": []}, {"function": {"name": "get_weather"}}, "get_weather", "auto"]  # fmt: skip


def _set(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``body`` with the dotted ``path`` (``[0]`` for a list index) set to ``value``."""
    out = json.loads(json.dumps(body))
    keys: list[Any] = [int(k[1:-1]) if k.startswith("[") else k for k in path.replace("[", ".[").split(".") if k]
    at = out
    for k in keys[:-1]:
        at = at[k]
    at[keys[-1]] = value
    return out


def test_fuzzed_tools_and_response_formats_are_400s_naming_their_field(json_server: ServeProc) -> None:
    """Each field of ``tools``, ``tool_choice`` and ``response_format`` set to junk: a 400 naming one of them
    (or ``max_tokens``, for a schema no 40-token reply fits), or a reply, never a 500."""
    tools = {"model": MODEL, "messages": USER, "max_tokens": 40, "temperature": 0.0, "tools": [WEATHER, TIME],
             "tool_choice": {"type": "function", "function": {"name": "get_time"}}}  # fmt: skip
    fmt = {"model": MODEL, "messages": USER, "max_tokens": 40, "temperature": 0.0, "response_format": schema_format(PERSON)}
    cases = [(tools, p) for p in ("tools", "tools[0]", "tools[0].type", "tools[0].function", "tools[0].function.name",
                                  "tools[0].function.parameters", "tools[1].function.parameters.properties",
                                  "tool_choice", "tool_choice.function", "tool_choice.function.name",
                                  "parallel_tool_calls")]  # fmt: skip
    cases += [(fmt, p) for p in ("response_format", "response_format.type", "response_format.json_schema",
                                 "response_format.json_schema.name", "response_format.json_schema.schema",
                                 "response_format.json_schema.schema.properties.age")]  # fmt: skip
    seen: dict[int, int] = {}
    with httpx.Client(base_url=json_server.base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as http:
        for body, path in cases:
            named = ("response_format", "max_tokens") if body is fmt else (
                "tools", "tool_choice", "parallel_tool_calls", "max_tokens")  # fmt: skip
            for value in JUNK:
                r = http.post("/v1/chat/completions", json=_set(body, path, value))
                seen[r.status_code] = seen.get(r.status_code, 0) + 1
                assert r.status_code in (200, 400), (path, value, r.text)
                if r.status_code == 400:
                    msg = r.json()["error"]["message"]
                    assert msg.startswith(named) and "Traceback" not in msg, (path, value, msg)
                else:
                    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    assert seen[400] >= len(cases) * len(JUNK) // 2, seen
