"""Models without a hub: presets, seeded random init, GGUF import, loading, and the unit layout."""

from noodle.models.adapter import UnitLayout, layout_of
from noodle.models.conformance import check_verified, verified_types
from noodle.models.gguf import import_gguf
from noodle.models.loading import PRESETS, build_model, init_model, load_config, load_model
from noodle.models.resolve import resolve_model

__all__ = [
    "PRESETS", "UnitLayout", "layout_of", "build_model", "init_model", "load_config", "load_model",
    "import_gguf", "resolve_model", "check_verified", "verified_types",
]  # fmt: skip
