"""Models without a hub: presets, seeded random init, GGUF import, loading, and the unit layout.

Names are imported on first use, so the torch-free modules (:mod:`noodle.models.paramcount`,
:mod:`noodle.models.analytic` for the families it counts from a config) never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from noodle.models.adapter import UnitLayout, layout_of
    from noodle.models.conformance import check_verified, verified_types
    from noodle.models.gguf import import_gguf
    from noodle.models.loading import PRESETS, build_model, init_model, load_config, load_model
    from noodle.models.resolve import resolve_model

__all__ = [
    "PRESETS", "UnitLayout", "layout_of", "build_model", "init_model", "load_config", "load_model",
    "import_gguf", "resolve_model", "check_verified", "verified_types",
]  # fmt: skip

_WHERE = {
    "UnitLayout": "adapter", "layout_of": "adapter", "check_verified": "conformance", "verified_types": "conformance",
    "import_gguf": "gguf", "PRESETS": "loading", "build_model": "loading", "init_model": "loading",
    "load_config": "loading", "load_model": "loading", "resolve_model": "resolve",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'noodle.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"noodle.models.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
