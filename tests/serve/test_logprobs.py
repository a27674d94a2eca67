"""Log probabilities through the ``openai`` client, checked against a direct transformers forward.

The server reports log-softmax of the logits each token was sampled from (temperature applied);
a transformers forward over prompt + generated tokens gives the same numbers within ``TOL``
(float32: the packed, batched stages sum in a different order than one whole forward).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from .conftest import API_KEY
from .servers import ServeProc

MODEL = "gpt2-tiny"
PROMPT = "The planner measures every layer and"
TOL = 1e-5  # measured: they agree within 1e-6 on gpt2-tiny


def client(server: ServeProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> Iterator[Any]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    yield model


def hf_logprobs(model: Any, prompt: list[int], new: list[int], temperature: float = 1.0) -> torch.Tensor:
    """``(len(new), vocab)``: log-softmax of the logits that predicted each new token, divided by ``temperature``."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new])).logits[0, len(prompt) - 1 : len(prompt) + len(new) - 1]
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def hf_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([prompt + out])).logits[0, -1].argmax()))
    return out


def test_completion_logprobs_match_transformers(server: ServeProc, tokenizer: Any, hf_model: Any) -> None:
    ids = list(tokenizer(PROMPT)["input_ids"])
    res = client(server).completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0, logprobs=5)
    lp = res.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    n = len(lp.tokens)
    assert n == res.usage.completion_tokens - (res.choices[0].finish_reason == "stop")  # EOS has no text, no entry
    new = hf_greedy(hf_model, ids, n)
    want = hf_logprobs(hf_model, ids, new)
    for k, tok in enumerate(new):
        assert lp.tokens[k] == _piece(tokenizer, tok)  # greedy: the token is transformers' argmax
        assert lp.token_logprobs[k] == pytest.approx(float(want[k, tok]), abs=TOL)
        top = torch.topk(want[k], 5)
        assert set(lp.top_logprobs[k]) == {_piece(tokenizer, int(i)) for i in top.indices}
        for i, v in zip(top.indices.tolist(), top.values.tolist()):
            assert lp.top_logprobs[k][_piece(tokenizer, i)] == pytest.approx(v, abs=TOL)
    assert "".join(lp.tokens) == res.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(n)]


def test_chat_logprobs_with_sampling_match_transformers(server: ServeProc, tokenizer: Any, hf_model: Any) -> None:
    messages = [{"role": "user", "content": "Name three planets."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    res = client(server).chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12,
                                                  temperature=0.7, seed=11, logprobs=True, top_logprobs=3)  # fmt: skip
    content = res.choices[0].logprobs.content
    assert content and len(content) == res.usage.completion_tokens - (res.choices[0].finish_reason == "stop")
    new = [_id_of(tokenizer, e.bytes) for e in content]
    want = hf_logprobs(hf_model, prompt, new, temperature=0.7)
    for k, entry in enumerate(content):
        assert entry.logprob == pytest.approx(float(want[k, new[k]]), abs=TOL)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(torch.topk(want[k], 3).values.tolist(), abs=TOL)
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1.0 + 1e-6
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6
        assert bytes(entry.bytes).decode("utf-8", errors="backslashreplace") == entry.token
    joined = b"".join(bytes(e.bytes) for e in content)  # random weights: bytes that are not UTF-8 show as U+FFFD
    assert joined.decode("utf-8", errors="replace") == res.choices[0].message.content


def test_streamed_logprobs_equal_the_whole_response(server: ServeProc) -> None:
    c = client(server)
    args: dict[str, Any] = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    whole = c.chat.completions.create(**args).choices[0].logprobs.content
    chunks = list(c.chat.completions.create(**args, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in streamed] == \
           [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in whole]  # fmt: skip
    done = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1)
    parts = list(c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1, stream=True))
    got = [(t, v) for p in parts if p.choices and p.choices[0].logprobs
           for t, v in zip(p.choices[0].logprobs.tokens, p.choices[0].logprobs.token_logprobs)]  # fmt: skip
    assert got == list(zip(done.choices[0].logprobs.tokens, done.choices[0].logprobs.token_logprobs))


def test_without_logprobs_there_are_none(server: ServeProc) -> None:
    res = client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert res.choices[0].logprobs is None


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
])  # fmt: skip
def test_bad_logprobs_are_400_naming_the_field(server: ServeProc, path: str, extra: dict[str, Any], param: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 2, **extra}
    body.update({"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"})
    r = httpx.post(f"{server.base}{path}", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def _piece(tokenizer: Any, token_id: int) -> str:
    from noodle.serve.text import TokenPieces

    return TokenPieces(tokenizer)(token_id)[0]


def _id_of(tokenizer: Any, raw: list[int]) -> int:
    """The vocabulary id whose bytes are ``raw`` (byte-level vocabulary)."""
    from noodle.serve.text import TokenPieces

    pieces = TokenPieces(tokenizer)
    found = [i for i in range(len(tokenizer)) if pieces(i)[1] == raw]
    assert len(found) == 1, (raw, found)
    return found[0]
