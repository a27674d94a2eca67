"""What a stage must do besides calling its modules: the glue each family keeps in its top-level forward.

transformers' models do a few things outside any placement unit's modules: the base model scales
the embeddings (Granite's ``embedding_multiplier``), builds ALiBi biases (BLOOM) or one rotary
table per attention kind (Gemma 3), and the causal-LM class scales or soft-caps the logits
(Granite's ``logits_scaling``, Cohere's ``logit_scale``, Gemma 2/3's ``final_logit_softcapping``).
Blocks also differ in how they take the KV cache (``cache``, ``past_key_values``, ``layer_past``)
and whether they return a tuple. This module reads all of that from the config and the modules'
signatures; the architecture conformance suite (tests/models/test_architectures.py) checks that
every family it lists stages exactly with it.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from noodle.errors import ModelError

__all__ = ["BlockCall", "block_call", "embed_multiplier", "logits_glue", "positions_call", "alibi_bias"]

_CACHE_KWARGS = ("cache", "past_key_values", "layer_past", "past_key_value")


@dataclass(frozen=True)
class BlockCall:
    """How a decoder block takes its inputs.

    Attributes:
        cache_kw: the keyword of the KV cache.
        alibi: the block takes an ``alibi`` bias (``None`` when the model does not use ALiBi).
        position_ids: the block takes ``position_ids``.
        rotary_by_kind: the rotary helper takes the layer's attention kind (``layer_type``).
    """

    cache_kw: str
    alibi: bool
    position_ids: bool
    rotary_by_kind: bool


def _params(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


def block_call(block: nn.Module, rotary: nn.Module | None) -> BlockCall:
    """Read a block's (and the rotary helper's) calling convention from their signatures.

    Raises:
        ModelError: the block takes no KV cache argument noodle knows.
    """
    params = _params(block.forward)
    cache_kw = next((k for k in _CACHE_KWARGS if k in params), None)
    if cache_kw is None:
        raise ModelError(
            f"{type(block).__name__}.forward takes no KV cache argument ({', '.join(_CACHE_KWARGS)}); "
            "noodle cannot keep its cache across stages"
        )
    by_kind = rotary is not None and "layer_type" in _params(rotary.forward)
    return BlockCall(cache_kw, "alibi" in params, "position_ids" in params, by_kind)


def uses_alibi(config: Any) -> bool:
    """Whether the model adds ALiBi biases (BLOOM always; Falcon when ``alibi`` is set)."""
    return bool(getattr(config, "alibi", False)) or getattr(config, "model_type", "") == "bloom"


def alibi_bias(block: nn.Module, config: Any, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ALiBi tensor ``(batch * heads, 1, seen)`` of the block's own module, from the full 2-D mask."""
    build = getattr(sys.modules[type(block).__module__], "build_alibi_tensor", None)
    if build is None:
        raise ModelError(f"{type(block).__name__} takes ALiBi biases but its module has no build_alibi_tensor")
    return build(mask, int(config.num_attention_heads), dtype)


def positions_call(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Call a learned position embedding with position ids (``nn.Embedding``, or OPT's ``(mask, ..., position_ids)``)."""
    params = _params(module.forward)
    if "position_ids" not in params:
        return module
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n != "position_ids"]
    return lambda positions: module(*[None] * len(required), position_ids=positions)


def embed_multiplier(config: Any) -> float | None:
    """Granite-style ``embedding_multiplier`` the base model applies to the token embeddings."""
    value = getattr(config, "embedding_multiplier", None)
    return None if value in (None, 1, 1.0) else float(value)


def logits_glue(config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the causal-LM class does to ``lm_head``'s output: scaling and soft-capping, in its order."""
    ops: list[Callable[[torch.Tensor], torch.Tensor]] = []
    scaling = getattr(config, "logits_scaling", None)  # Granite divides
    if scaling not in (None, 1, 1.0):
        divisor = float(scaling)
        ops.append(lambda x: x / divisor)
    scale = getattr(config, "logit_scale", None)  # Cohere multiplies
    if isinstance(scale, (int, float)) and scale != 1:
        factor = float(scale)
        ops.append(lambda x: x * factor)
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        c = float(cap)
        ops.append(lambda x: torch.tanh(x / c) * c)
    if not ops:
        return None

    def apply(x: torch.Tensor) -> torch.Tensor:
        for op in ops:
            x = op(x)
        return x

    return apply
