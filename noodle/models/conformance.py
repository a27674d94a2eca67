"""Which architectures stage exactly: the cases the architecture conformance suite runs.

Each entry of :data:`CASES` is a tiny config built with transformers' own config class for
that ``model_type``. tests/models/test_architectures.py builds every case with seeded random
weights, saves it, and checks that staged execution (1, 3 and 4 stages, a left-padded batch)
gives the logits and greedy tokens of the unsplit model's ``generate()``. An architecture is
*verified* exactly when it has a case here, so the list cannot drift from the tests: a case
that stops passing fails the suite. Everything else is refused at profile, solve and exec
(:func:`check_verified`) instead of being run, possibly wrong.

:data:`LIMITS` refuses the variants of a verified family that its case does not cover.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from noodle.errors import ModelError

__all__ = ["CASES", "KEYS_BACK_TO_BACK", "LIMITS", "TINY", "UNPACKED", "check_verified", "verified_types"]

TINY: dict[str, Any] = dict(
    num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
_NO_KV = {k: v for k, v in TINY.items() if k != "num_key_value_heads"}
_MLA: dict[str, Any] = dict(  # multi-head latent attention (DeepSeek-style)
    TINY, num_key_value_heads=4, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=16,
    q_lora_rank=32, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
    n_group=1, topk_group=1,
)  # fmt: skip

# model_type -> config kwargs of its tiny case (4 decoder blocks: 6 placement units).
CASES: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=4, n_embd=64, n_head=4, n_positions=256, vocab_size=512, bos_token_id=1, eos_token_id=2),
    "llama": dict(TINY),
    "qwen2": dict(TINY),
    "mistral": dict(TINY, sliding_window=6),
    "gpt_neox": dict(_NO_KV, tie_word_embeddings=False),
    "opt": dict(_NO_KV, ffn_dim=128, word_embed_proj_dim=64, pad_token_id=0),
    "gemma": dict(TINY, head_dim=16),
    "gemma2": dict(TINY, head_dim=16, sliding_window=6, final_logit_softcapping=5.0, attn_logit_softcapping=20.0),
    "gemma3_text": dict(TINY, head_dim=16, sliding_window=6, final_logit_softcapping=5.0),
    "granite": dict(TINY, embedding_multiplier=3.0, logits_scaling=4.0, residual_multiplier=0.5, attention_multiplier=0.3),
    "falcon": dict(_NO_KV, new_decoder_architecture=True, num_kv_heads=2, alibi=False),
    "bloom": dict(n_layer=4, hidden_size=64, n_head=4, vocab_size=512, bos_token_id=1, eos_token_id=2),
    "cohere": dict(TINY, logit_scale=0.5),
    "mixtral": dict(TINY, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    # cases that need a few fields beyond the common tiny ones (head sizes, rotary dims, MLA ranks, pad ids)
    "deepseek_v2": dict(_MLA), "deepseek_v3": dict(_MLA),
    "glm4_moe_lite": dict(_MLA), "minicpm3": dict(_MLA), "youtu": dict(_MLA), "sarvam_mla": dict(_MLA),
    "axk1": dict(TINY, num_key_value_heads=4),
    "gptj": dict(_NO_KV, rotary_dim=8), "codegen": dict(_NO_KV, rotary_dim=8),
    "helium": dict(TINY, head_dim=16), "ministral": dict(TINY, head_dim=16),
    "llama4_text": dict(TINY, head_dim=16, num_local_experts=4, intermediate_size_mlp=128, attention_chunk_size=8),
    "hunyuan_v1_dense": dict(TINY, head_dim=16), "hunyuan_v1_moe": dict(TINY, head_dim=16),
    "glm": dict(TINY, pad_token_id=0), "glm4": dict(TINY, pad_token_id=0), "flex_olmo": dict(TINY, pad_token_id=0),
    "phi3": dict(TINY, pad_token_id=0), "smollm3": dict(TINY, pad_token_id=0),
    "gpt_neo": dict(
        num_layers=4, hidden_size=64, num_heads=4, vocab_size=512, max_position_embeddings=256,
        attention_types=[[["global", "local"], 2]], window_size=6, bos_token_id=1, eos_token_id=2,
    ),
    # cases the common tiny fields build as they are
    **{t: dict(TINY) for t in (
        "afmoe", "apertus", "apertus1p5_text", "arcee", "aria_text", "biogpt", "bitnet", "cohere2", "cohere2_moe",
        "cwm", "diffllama", "doge", "ernie4_5", "ernie4_5_moe", "exaone", "exaone4", "exaone_moe", "flint", "glm4_moe",
        "gpt-sw3", "gpt_bigcode", "gpt_neox_japanese", "gpt_oss", "granitemoe", "granitemoeshared", "hy_v3",
        "hyperclovax", "internlm3", "iquestcoder", "jais2", "jetmoe", "kolibri1", "laguna", "lfm2", "mellum",
        "minimax_m2", "minimax_m3_vl_text", "ministral3", "moshi", "nemotron", "olmo", "olmo2", "olmo3", "olmoe",
        "persimmon", "phi", "phimoe", "qwen3", "qwen3_moe", "sarvam_moe", "seed_oss", "solar_open", "stablelm",
        "starcoder2", "vaultgemma",
    )},
}


# Verified architectures whose stages run packed steps (continuous batching) one sequence at a time: their
# attention does not take the packed 4-D mask as every other case does. tests/executors/test_batching.py
# checks that every other case packs to the tokens and logits of each sequence run alone.
UNPACKED: dict[str, str] = {
    "gpt_neo": "its local attention builds its own causal window from the key length",
    "doge": "its dynamic mask adds learned biases wherever the attention mask is materialized",
}

# Verified architectures whose packed steps attend over all the step's keys back to back under one mask
# (attention cost: the step's sequences times all their keys) instead of each sequence against its own
# keys through noodle's attention function: their attention modules compute attention themselves or
# reshape keys and values around the attention interface (multi-head latent attention, differential
# attention, per-expert attention).
KEYS_BACK_TO_BACK: frozenset[str] = frozenset({
    "deepseek_v2", "deepseek_v3", "glm4_moe_lite", "minicpm3", "youtu", "sarvam_mla", "axk1", "diffllama",
    "gpt_neox_japanese", "jetmoe",
})  # fmt: skip

def _falcon(config: Any) -> str | None:
    if getattr(config, "alibi", False):
        return "alibi=true (Falcon folds ALiBi into the attention mask in its top-level forward, which stages do not)"
    return None


def _opt(config: Any) -> str | None:
    if getattr(config, "word_embed_proj_dim", None) not in (None, config.hidden_size):
        return (
            f"word_embed_proj_dim={config.word_embed_proj_dim} != hidden_size={config.hidden_size} "
            "(project_in runs before the positions are added, which the embed unit does not order)"
        )
    return None


# model_type -> the reason a config of a verified family is outside what its case covers, or None.
LIMITS: dict[str, Callable[[Any], str | None]] = {"falcon": _falcon, "opt": _opt}


def verified_types() -> list[str]:
    """The model types that stage exactly (those with a conformance case)."""
    return list(CASES)


def check_verified(config: Any, where: str = "") -> None:
    """Refuse an architecture (or a variant) whose staged execution is not verified exact.

    Raises:
        ModelError: one line: the architecture, why, what to do.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = str(getattr(text, "model_type", "") or getattr(config, "model_type", ""))
    arch = ", ".join(getattr(config, "architectures", None) or []) or model_type
    lead = f"{where}: " if where else ""
    if model_type not in CASES:
        raise ModelError(
            f"{lead}architecture {model_type!r} ({arch}) is not verified to stage exactly (no passing case in "
            "noodle's architecture conformance suite; a stage could silently skip glue in its top-level forward); "
            "run it unsplit with transformers, or add a tiny case to noodle.models.conformance.CASES and make "
            "tests/models/test_architectures.py pass"
        )
    limit = LIMITS.get(model_type)
    why = limit(text) if limit is not None else None
    if why:
        raise ModelError(
            f"{lead}architecture {model_type!r} with {why} is not verified to stage exactly; "
            f"noodle stages the {model_type} variant of its conformance case, run this one unsplit with transformers"
        )
