"""The official ``openai`` client and curl against ``noodle serve``: same tokens as the executor."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from noodle.executors import Sampling

from .conftest import API_KEY
from .servers import ServeProc

MODEL = "gpt2-tiny"
PROMPT = "The planner measures every layer and"


def client(server: ServeProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def expected_text(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def finish_of(ids: list[int], eos: int, n: int) -> str:
    return "stop" if ids and ids[-1] == eos else "length"


def test_models_lists_the_folder_name(server: ServeProc) -> None:
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client(server).models.retrieve(MODEL).id == MODEL


# Random weights make greedy text a run of one token; seeded sampling makes varied text to compare.
@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (1.0, 5)])
def test_completion_equals_generate(server: ServeProc, tokenizer: Any, reference: Callable, temperature: float,
                                    seed: int) -> None:  # fmt: skip
    ids = list(tokenizer(PROMPT)["input_ids"])
    want = reference(ids, 12, Sampling(temperature=temperature, seed=seed))
    res = client(server).completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=temperature, seed=seed)
    assert res.choices[0].text == expected_text(tokenizer, want)
    assert res.usage is not None
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (len(ids), len(want))
    assert res.choices[0].finish_reason == finish_of(want, tokenizer.eos_token_id, 12)


def test_completion_from_token_ids(server: ServeProc, tokenizer: Any, reference: Callable) -> None:
    ids = [5, 17, 99, 250, 3]
    want = reference(ids, 8)
    res = client(server).completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert res.choices[0].text == expected_text(tokenizer, want)
    assert res.usage.prompt_tokens == 5


def test_completion_stream_matches_non_stream(server: ServeProc) -> None:
    c = client(server)
    whole = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole.choices[0].text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_uses_the_template(server: ServeProc, tokenizer: Any, reference: Callable) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    want = reference(ids, 9, Sampling(temperature=1.0, seed=11))
    c = client(server)
    res = c.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=9, temperature=1.0, seed=11)
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == expected_text(tokenizer, want)
    assert res.usage.prompt_tokens == len(ids)
    stream = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=9, temperature=1.0, seed=11,
                                       stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == res.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == res.choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(server: ServeProc, stream: bool) -> None:
    c = client(server)
    opts: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "seed": 3}
    full = c.completions.create(**opts).choices[0].text
    assert len(full) >= 12, full
    stop = full[6:10]  # spans token boundaries: the placeholder tokens are several characters long
    cut = full[: full.find(stop)]
    assert len(cut) >= 1
    if stream:
        chunks = list(c.completions.create(**opts, stop=[stop, "\x00"], stream=True))
        text = "".join(ch.choices[0].text for ch in chunks)
        reason = [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason]
    else:
        res = c.completions.create(**opts, stop=stop)
        text, reason = res.choices[0].text, [res.choices[0].finish_reason]
    assert text == cut and stop not in text
    assert reason == ["stop"]


def test_seeded_sampling_repeats(server: ServeProc) -> None:
    c = client(server)
    runs = [c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=s)
            .choices[0].text for s in (7, 7, 8)]  # fmt: skip
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_sixteen_concurrent_streams_get_their_own_tokens(server: ServeProc, tokenizer: Any, reference: Callable) -> None:
    # Random weights make greedy text collapse to one string; seeded sampling gives each client its own.
    prompts = [f"Prompt number {i}: the quick brown fox {'jumps ' * (i % 4)}" for i in range(16)]
    want = [expected_text(tokenizer, reference(list(tokenizer(p)["input_ids"]), 12, Sampling(temperature=1.0, seed=i)))
            for i, p in enumerate(prompts)]  # fmt: skip

    async def one(c: openai.AsyncOpenAI, i: int, p: str) -> str:
        stream = await c.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=1.0, seed=i, stream=True)
        return "".join([ch.choices[0].text async for ch in stream])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, i, p) for i, p in enumerate(prompts)))

    got = asyncio.run(main())
    assert got == want
    assert len(set(want)) == 16  # every client has its own text to get back


def curl(*args: str) -> str:
    out = subprocess.run(["curl", "-sS", "--max-time", "60", *args], capture_output=True, text=True, check=True)
    return out.stdout


def test_curl_completion_equals_noodle_exec(server: ServeProc, model_dir: Path, plan_file: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "noodle.cli.main", "exec", str(plan_file), "--model", str(model_dir),
                          "--prompt", PROMPT, "-n", "10", "--format", "json", "--threads", "1", "--temperature", "0.8",
                          "--seed", "42"],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    tokens = json.loads(run.stdout)["tokens"][0]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    eos = tok.eos_token_id
    tokens = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 10, "temperature": 0.8, "seed": 42})
    res = json.loads(curl(f"{server.base}/v1/completions", "-H", f"Authorization: Bearer {API_KEY}",
                          "-H", "Content-Type: application/json", "-d", body))  # fmt: skip
    assert res["choices"][0]["text"] == tok.decode(tokens, skip_special_tokens=True)
    assert res["usage"]["completion_tokens"] == len(tokens)
    assert len(set(tokens)) > 1  # sampled: a real sequence, not one token repeated


def test_curl_stream_is_sse_ending_in_done(server: ServeProc) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})  # fmt: skip
    out = curl("-N", f"{server.base}/v1/chat/completions", "-H", f"Authorization: Bearer {API_KEY}", "-d", body)
    events = [block for block in out.split("\n\n") if block.strip()]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1]["usage"]["completion_tokens"] <= 5 and chunks[-1]["choices"] == []
