"""Where transformers releases differ in what noodle calls (the tested range: :data:`noodle.extras.TESTED_TRANSFORMERS`).

Each shim inspects the signature once instead of comparing version numbers.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

__all__ = ["make_mask"]


@lru_cache(maxsize=None)
def _cache_keyword(func: Any) -> str:
    """The name a mask builder takes the KV cache under (``cache`` in 5.25, ``past_key_values`` in 5.17)."""
    params = inspect.signature(func).parameters
    return "cache" if "cache" in params else "past_key_values"


def make_mask(kind_func: str, config: Any, hidden: Any, mask: Any, cache: Any, positions: Any, layer: int) -> Any:
    """transformers' 4-D mask builder ``kind_func`` (``create_causal_mask`` ...), whatever its cache keyword."""
    import transformers.masking_utils as mu

    func = getattr(mu, kind_func)
    return func(config=config, inputs_embeds=hidden, attention_mask=mask, position_ids=positions, layer_idx=layer,
                **{_cache_keyword(func): cache})  # fmt: skip
