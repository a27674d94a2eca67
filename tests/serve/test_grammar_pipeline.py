"""Tool calls and JSON-schema output through a three-stage plan on ``noodle worker`` processes.

``noodle serve --backend grpc`` serves a plan that cuts gpt2-tiny (embed, 4 blocks, head) into three
stages, each on its own ``noodle worker`` subprocess on 127.0.0.1; the grammar's mask is applied where
the last stage's logits are sampled, on the coordinator. Every request goes through the ``openai``
package, streamed and not, and its greedy output must equal the same request's output on a one-stage
``noodle serve`` of the same folder: the pipeline must not change what the grammar allows. Every
process (three workers, two servers) is stopped at the end, and checked gone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from noodle.plandoc import dump_plan

from ..executors.conformance import plan_for
from ..executors.procs import WorkerPool, children
from .conftest import API_KEY
from .grammar_model import MODEL, PERSON, TIME, USER, WEATHER, json_model, schema_format
from .servers import ServeProc, start_serve

pytest.importorskip("xgrammar")

CUTS = [0, 2, 4, 6]  # embed+block0 | block1+block2 | block3+head


@pytest.fixture(scope="module")
def servers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProc, ServeProc]]:
    """``(three-stage, one-stage)`` servers of the same model folder."""
    from noodle.serve.planning import plan_this_machine

    root = tmp_path_factory.mktemp("grammar-pipeline")
    model = json_model(model_dir, root)
    (root / "three.json").write_text(dump_plan(plan_for(model, CUTS, batch_size=4)))
    one, _ = plan_this_machine(model, concurrency=4)
    (root / "one.json").write_text(dump_plan(one))
    common = ["--model", str(model), "--api-key", API_KEY, "--chat-template", str(root / "chat.jinja"),
              "--concurrency", "4"]  # fmt: skip
    before = {p.pid for p in children()}
    pool = WorkerPool(model, 3, cli=3)
    try:
        workers = ",".join(f"node{i}={w.address}" for i, w in enumerate(pool.workers))
        with start_serve([*common, "--plan", str(root / "three.json"), "--backend", "grpc", "--workers", workers]) as three, \
                start_serve([*common, "--plan", str(root / "one.json")]) as single:  # fmt: skip
            yield three, single
    finally:
        pool.close()
    assert not [c for c in children() if c.pid not in before], "worker or server processes left behind"


def _client(server: ServeProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def _json_reply(server: ServeProc, stream: bool) -> tuple[str, str | None]:
    """``(content, finish_reason)`` of a greedy json_schema request."""
    kw: dict[str, Any] = dict(model=MODEL, messages=USER, max_tokens=120, temperature=0.0, seed=3,
                              response_format=schema_format(PERSON))  # fmt: skip
    c = _client(server)
    if not stream:
        res = c.chat.completions.create(**kw)
        return res.choices[0].message.content or "", res.choices[0].finish_reason
    chunks = list(c.chat.completions.create(**kw, stream=True))
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), (reasons or [None])[-1]


def _tool_call(server: ServeProc, stream: bool) -> tuple[str, str, str | None]:
    """``(name, arguments, finish_reason)`` of a greedy request whose tool_choice forces ``get_weather``."""
    kw: dict[str, Any] = dict(model=MODEL, messages=USER, tools=[WEATHER, TIME], max_tokens=80, temperature=0.0,
                              tool_choice={"type": "function", "function": {"name": "get_weather"}})  # fmt: skip
    c = _client(server)
    if stream:
        with c.chat.completions.stream(**kw) as s:
            res = s.get_final_completion()
    else:
        res = c.chat.completions.create(**kw)
    choice = res.choices[0]
    calls = choice.message.tool_calls or []
    assert len(calls) == 1, choice
    assert calls[0].id.startswith("call_") and calls[0].type == "function"
    return calls[0].function.name, calls[0].function.arguments, choice.finish_reason


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_schema_through_three_stages_equals_one_stage(servers: tuple[ServeProc, ServeProc], stream: bool) -> None:
    three, single = servers
    text, reason = _json_reply(three, stream)
    assert reason == "stop", text
    jsonschema.validate(json.loads(text), PERSON)
    assert (text, reason) == _json_reply(single, stream)
    assert (text, reason) == _json_reply(three, not stream)  # streaming does not change the reply either


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_forced_tool_call_through_three_stages_equals_one_stage(servers: tuple[ServeProc, ServeProc],
                                                                stream: bool) -> None:  # fmt: skip
    three, single = servers
    name, arguments, reason = _tool_call(three, stream)
    assert name == "get_weather" and reason == "tool_calls"
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert (name, arguments, reason) == _tool_call(single, stream)
    assert "grpc" in three.log() and "local" in single.log()  # the servers are what this test says they are
