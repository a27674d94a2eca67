"""How many tokens of KV cache each stage of a plan can hold beside its weights.

The pipeline admits a request only while every stage has room for its whole context
(prompt + new tokens): a request that does not fit waits, it never runs out of memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from noodle.models.card import max_positions
from noodle.plandoc import PlanDoc

__all__ = ["kv_bytes_per_token_per_layer", "max_positions", "kv_capacity_tokens", "stage_layers"]


def kv_bytes_per_token_per_layer(config: Any, element_size: int = 4) -> int:
    """Bytes one token adds to one attention layer's cache: keys and values of every KV head."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    return 2 * int(kv_heads) * int(head_dim) * element_size


def stage_layers(units: Sequence[str]) -> int:
    """Decoder blocks among a stage's units (their names start with ``block.``)."""
    return sum(1 for u in units if u.startswith("block."))


def kv_capacity_tokens(
    plan: PlanDoc, config: Any, param_bytes: Sequence[int], layers: Sequence[int], element_size: int | Sequence[int] = 4
) -> list[int]:
    """Per stage: ``(memory_available - weights) / KV bytes per token`` (a stage with no layers is unbounded).

    Args:
        plan: the plan (its ``memory_available_mb`` per stage).
        config: the model config.
        param_bytes: bytes of weights each stage holds.
        layers: decoder layers each stage holds.
        element_size: bytes of one cached value, for every stage or per stage (its compute dtype's).
    """
    sizes = [element_size] * len(plan.stages) if isinstance(element_size, int) else list(element_size)
    caps = []
    for doc, weights, n, size in zip(plan.stages, param_bytes, layers, sizes):
        per_layer = kv_bytes_per_token_per_layer(config, size)
        if n == 0 or per_layer == 0:
            caps.append(2**62)
            continue
        free = doc.memory_available_mb * 2**20 - weights
        caps.append(max(0, int(free // (per_layer * n))))
    return caps
