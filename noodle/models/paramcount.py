"""Parameters per placement unit from a config.json alone: no torch, no transformers.

For the families whose layout is fixed and well known (GPT-2; the Llama family: llama, mistral,
qwen2) the counts follow from the config's sizes, the same numbers building the model on the
``meta`` device gives (a test compares them on every family and on the published configs in
``shared/model-configs``). Other model types return ``None`` here and are counted by building the
model (:func:`noodle.models.analytic.analytic_units`, which needs the ``exec`` extra).

Units as :func:`noodle.models.layout_of` names them: ``embed`` (token and position tables),
``block.i``, ``lm_head`` (final norm + output projection; a tied projection is charged in full).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ConfigFacts", "UnitParams", "facts_of", "unit_params", "LLAMA_LIKE"]

LLAMA_LIKE = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ConfigFacts:
    """The sizes of a config that the analytic profile reads (GPT-2's names mapped to the common ones)."""

    model_type: str
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int
    intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    dtype: str | None = None


@dataclass(frozen=True)
class UnitParams:
    """Parameters of each unit, unique parameters (a tied head once) and the number of embedding tables."""

    names: tuple[str, ...]
    params: tuple[int, ...]
    unique: int
    tied: bool
    embed_tables: int


def _int(raw: dict[str, Any], *keys: str, default: int | None = None) -> int | None:
    for key in keys:
        value = raw.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def facts_of(raw: dict[str, Any]) -> ConfigFacts | None:
    """The sizes of a config.json object, or ``None`` when its family or its fields are not one this module counts."""
    kind = raw.get("model_type")
    dtype = raw.get("dtype") or raw.get("torch_dtype")
    dtype = str(dtype).removeprefix("torch.") if dtype else None
    if kind == "gpt2":
        hidden, heads = _int(raw, "n_embd", "hidden_size"), _int(raw, "n_head", "num_attention_heads")
        layers, vocab = _int(raw, "n_layer", "num_hidden_layers"), _int(raw, "vocab_size")
        positions = _int(raw, "n_positions", "max_position_embeddings")
        if None in (hidden, heads, layers, vocab, positions) or hidden % heads:  # type: ignore[operator]
            return None
        return ConfigFacts("gpt2", hidden, heads, heads, hidden // heads, layers, vocab,  # type: ignore[arg-type,operator]
                           _int(raw, "n_inner", default=4 * hidden), positions, bool(raw.get("tie_word_embeddings", True)),  # type: ignore[arg-type,operator]
                           dtype=dtype)  # fmt: skip
    if kind in LLAMA_LIKE:
        hidden, heads = _int(raw, "hidden_size"), _int(raw, "num_attention_heads")
        layers, vocab, inter = _int(raw, "num_hidden_layers"), _int(raw, "vocab_size"), _int(raw, "intermediate_size")
        if None in (hidden, heads, layers, vocab, inter):
            return None
        head_dim = _int(raw, "head_dim") or (hidden // heads if hidden % heads == 0 else None)  # type: ignore[operator]
        if head_dim is None:
            return None
        kv_heads = _int(raw, "num_key_value_heads", default=heads if kind == "llama" else None)
        if kv_heads is None:  # mistral's and qwen2's config classes default it to their own numbers: build those
            return None
        return ConfigFacts(str(kind), hidden, heads, kv_heads, head_dim,  # type: ignore[arg-type]
                           layers, vocab, inter, _int(raw, "max_position_embeddings", default=2048),  # type: ignore[arg-type]
                           bool(raw.get("tie_word_embeddings", False)),
                           attention_bias=bool(raw.get("attention_bias", False)), mlp_bias=bool(raw.get("mlp_bias", False)),
                           dtype=dtype)  # fmt: skip
    return None


def unit_params(f: ConfigFacts) -> UnitParams:
    """Parameters of every unit of ``f``'s model (see the module docstring)."""
    h, v = f.hidden_size, f.vocab_size
    head = v * h
    if f.model_type == "gpt2":
        inner = f.intermediate_size
        block = 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + 2 * h + (h * inner + inner) + (inner * h + h)
        embed, final, tables = v * h + f.max_position_embeddings * h, 2 * h, 2
    else:
        q, kv = f.num_attention_heads * f.head_dim, f.num_key_value_heads * f.head_dim
        qkv_bias = q + 2 * kv if f.attention_bias or f.model_type == "qwen2" else 0
        o_bias = h if f.attention_bias else 0
        attn = h * q + 2 * h * kv + q * h + qkv_bias + o_bias
        mlp = 3 * h * f.intermediate_size + ((2 * f.intermediate_size + h) if f.mlp_bias else 0)
        block = 2 * h + attn + mlp
        embed, final, tables = v * h, h, 1
    names = ("embed", *(f"block.{i}" for i in range(f.num_hidden_layers)), "lm_head")
    params = (embed, *([block] * f.num_hidden_layers), final + head)
    unique = embed + block * f.num_hidden_layers + final + (0 if f.tie_word_embeddings else head)
    return UnitParams(names, params, unique, f.tie_word_embeddings, tables)
