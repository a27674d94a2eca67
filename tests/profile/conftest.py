"""Tiny models and one shared profile run (tiny presets keep the suite fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

from noodle.models import build_model, load_config
from noodle.profile import ObservabilityEngine, ProfileConfig

SMALL = dict(prompt_tokens=12, decode_tokens=3, warmup=1, iterations=4, module_iterations=2)


@pytest.fixture(scope="session")
def small() -> dict:
    """The workload of the shared profile run."""
    return dict(SMALL)


@pytest.fixture(scope="session")
def gpt2_tiny():
    return build_model(load_config("gpt2-tiny"), seed=0)


@pytest.fixture(scope="session")
def llama_tiny():
    return build_model(load_config("llama-tiny"), seed=0)


@pytest.fixture(scope="session")
def gpt2_profile(tmp_path_factory, gpt2_tiny):
    """One profiled gpt2-tiny run with dashboard: (folder, report, engine)."""
    out: Path = tmp_path_factory.mktemp("gpt2-profile")
    engine = ObservabilityEngine(gpt2_tiny, out, ProfileConfig(model_name="gpt2-tiny", **SMALL))
    with engine:
        inputs = engine.make_inputs()
        engine.warmup(inputs, 2)
        report = engine.profile(inputs, 4)
        engine.save_dashboard("gpt2_profile")
    return out, report, engine
