"""Models without a hub: presets, seeded random init, loading, and the unit layout."""

from noodle.models.adapter import UnitLayout, layout_of
from noodle.models.loading import PRESETS, build_model, init_model, load_config, load_model

__all__ = ["PRESETS", "UnitLayout", "layout_of", "build_model", "init_model", "load_config", "load_model"]
