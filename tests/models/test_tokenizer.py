"""Locally trained tokenizers: text round-trips and every id fits the model's vocabulary."""

from __future__ import annotations

import pytest

from noodle.models.tokenizer import train_tokenizer


@pytest.mark.parametrize("vocab", [512, 50257])
def test_round_trip_and_ids_below_vocab(vocab):
    tok = train_tokenizer(vocab)
    text = "Hello world! Ünïcode and emoji 🍜 survive, as do 3.14 and {braces}."
    ids = tok(text)["input_ids"]
    assert ids and max(ids) < min(vocab, 2048)
    assert tok.decode(ids) == text
    assert len(tok) == vocab  # every id the model can emit decodes
    if vocab > 2048:
        assert tok.decode([vocab - 1]) == f"<t{vocab - 1}>"


def test_too_small_vocabulary_is_refused():
    with pytest.raises(ValueError, match="at least 258"):
        train_tokenizer(100)


def test_init_model_saves_a_loadable_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from noodle.models import init_model

    folder = init_model("llama-tiny", tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tok.decode(tok("the planner")["input_ids"]) == "the planner"
