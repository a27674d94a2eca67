"""The declared ranges, the lock file and the tested transformers range agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from noodle.extras import TESTED_TRANSFORMERS

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in (*project["dependencies"], *extras["exec"], *extras["dev"])]


def _locked() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    return {canonicalize_name(name): version for name, version in pins}


def test_lock_pins_every_declared_dependency_inside_its_range():
    locked = _locked()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in locked, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(locked[name], prereleases=True), f"{req.name}=={locked[name]} is outside {req}"


def test_declared_transformers_floor_is_the_tested_one_and_the_lock_its_newest():
    (req,) = [r for r in _declared() if r.name == "transformers"]
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert floors == [Version(TESTED_TRANSFORMERS[0])]
    assert _locked()["transformers"] == TESTED_TRANSFORMERS[1]


def test_makefile_installs_the_locked_torch():
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH_SPEC ?= torch=={_locked()['torch']}" in makefile  # the default; a CUDA build is a TORCH_SPEC away
    assert "-c constraints.txt $(TORCH_SPEC)" in makefile
    assert makefile.count("-c constraints.txt") >= 2  # torch first, then the project with its extras
