"""Tiny models of several decoder-only families, built once per test session."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from .conformance import FAMILIES
from .procs import spawner as spawner  # the fixture that lets a test spawn worker processes


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny matmuls on a shared 2-core box run ~10x faster on one thread than on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Family name -> folder of a 4-block model with seeded random weights (no tokenizer)."""
    from noodle.models import init_model

    root = tmp_path_factory.mktemp("models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: init_model(src, root / name, seed=0, tokenizer=False) for name, src in FAMILIES.items()}
