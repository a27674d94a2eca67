"""Incremental detokenization equals decoding all at once; stop strings are found across token boundaries."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noodle.serve.text import Detokenizer, StopMatcher


@pytest.fixture(scope="module")
def tok() -> Any:
    from noodle.models.tokenizer import train_tokenizer

    return train_tokenizer(512)


def test_incremental_text_equals_full_decode(tok: Any) -> None:
    rng = random.Random(1)
    for text in ("héllo wörld — naïve ✓ 漢字 🙂", "The quick brown fox", "def f(x): return x ** 2"):
        ids = tok(text)["input_ids"]
        det = Detokenizer(tok, prompt_ids=[rng.randrange(300) for _ in range(3)])
        pieces = [det.add(i) for i in ids] + [det.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
        assert all("\ufffd" not in p for p in pieces)  # a multi-byte character is never split


def test_random_ids_decode_the_same_incrementally(tok: Any) -> None:
    rng = random.Random(2)
    for _ in range(20):
        ids = [rng.randrange(512) for _ in range(30)]
        det = Detokenizer(tok)
        assert "".join(det.add(i) for i in ids) + det.flush() == tok.decode(ids, skip_special_tokens=True)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abcXY \n", max_size=40),
    stops=st.lists(st.text(alphabet="abcXY", min_size=1, max_size=4), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_stop_matcher_cuts_at_the_first_stop_whatever_the_chunking(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    m = StopMatcher(stops)
    out = "".join(m.feed(c) for c in chunks) + m.flush()
    # Generation stops at the first chunk that completes a stop; the text is cut where the
    # earliest stop seen by then begins (a longer stop still incomplete then never matters).
    for b in bounds[1:]:
        hits = [i for i in (text[:b].find(s) for s in stops) if i >= 0]
        if hits:
            assert out == text[: min(hits)] and m.matched is not None
            return
    assert out == text and m.matched is None


def test_stop_matcher_holds_back_only_a_possible_stop_start() -> None:
    m = StopMatcher(["END"])
    assert m.feed("abc E") == "abc "
    assert m.feed("N") == ""
    assert m.feed("X more") == "ENX more"
    assert m.feed("xxEND tail") == "xx" and m.matched == "END"
    assert m.feed("later") == "" and m.flush() == ""
