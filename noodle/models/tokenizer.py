"""A byte-level BPE tokenizer trained locally, so model folders made here can read text.

There is no hub to download GPT-2's or Llama's tokenizer from. ``noodle model init``
trains a small byte-level BPE (the GPT-2 scheme) on a short built-in corpus and saves
it beside the weights; any text encodes (bytes are the fallback alphabet) and every id
is below the model's vocabulary size. Ids the small corpus cannot fill (a preset's vocabulary
is larger than what a short text trains) are padded with placeholder tokens ``<t12345>``, so
every id the model can emit decodes to something visible. With random weights the generated text is noise,
but the text path — prompt in, tokens out, text back — is the real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CORPUS", "train_tokenizer", "save_tokenizer"]

CORPUS = """\
noodle splits one large language model across several unequal machines. A desktop GPU, a laptop
with an integrated GPU and a CPU server each hold a contiguous range of the model's layers.
The planner measures every layer, builds a cost graph of the cluster and asks an optimization
solver which node should run which layers, proving the plan optimal when it can. The executor
then runs the plan: the first stage embeds the prompt, every stage keeps its own key and value
cache, and the last stage turns hidden states into the next token. Hello world! The quick brown
fox jumps over the lazy dog. Once upon a time there was a model that fit on no machine alone.
def forward(self, hidden_states): return self.mlp(self.attention(hidden_states))
0 1 2 3 4 5 6 7 8 9 10 100 1000 2026 3.14159 - + * / = ( ) [ ] { } < > , . ; : ! ? ' "
"""

SPECIAL = "<|endoftext|>"


def train_tokenizer(vocab_size: int, corpus: str = CORPUS) -> Any:
    """A ``PreTrainedTokenizerFast`` with at most ``vocab_size`` ids (at least 258 are needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    size = min(vocab_size, 2048)
    if size < 258:
        raise ValueError(f"a byte-level tokenizer needs a vocabulary of at least 258, the model has {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer)
    tok = _pad_vocabulary(tok, vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL, bos_token=SPECIAL, unk_token=SPECIAL)


def _pad_vocabulary(tok: Any, vocab_size: int) -> Any:
    """Give every id below ``vocab_size`` a token; merges never produce the placeholders."""
    import json

    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    for i in range(max(vocab.values()) + 1, vocab_size):
        vocab.setdefault(f"<t{i}>", i)
    return Tokenizer.from_str(json.dumps(data))


def save_tokenizer(folder: str | Path, vocab_size: int) -> bool:
    """Train and save a tokenizer into ``folder``; False when the vocabulary is too small for one."""
    try:
        tokenizer = train_tokenizer(vocab_size)
    except ValueError:
        return False
    tokenizer.save_pretrained(folder)
    return True
