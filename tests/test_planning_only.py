"""Planning on an install without the ``exec`` extra: every command answers, none imports torch.

The CLI runs in a subprocess whose imports of the execution stack fail as they would on a
``pip install noodle`` (a meta-path blocker in ``sitecustomize``); ``make test-planning`` repeats the
check in a real venv with ``pip install .`` only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "transformers", "safetensors", "grpc", "fastapi", "starlette", "uvicorn", "httpx", "accelerate",
           "gguf", "prometheus_client", "psutil")  # fmt: skip
# specs that read `noodle profile` output a demo writes first: without it, one line naming the missing file
NEEDS_DEMO = {"gpt2-profiled.yaml": "out/profile/gpt2", "smollm2-home-lab.yaml": "out/profile/smollm2"}

BLOCKER = f"""
import sys
for name in {BLOCKED!r}:  # None in sys.modules: `import` fails and find_spec says absent, as on a bare install
    sys.modules[name] = None
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("planning-site")
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


def noodle(env: dict[str, str], *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "noodle.cli.main", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_the_blocker_blocks(env: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr


def test_help_and_version(env: dict[str, str]) -> None:
    for args in (["--help"], ["--version"], ["solve", "--help"], ["serve", "--help"], ["deploy", "kubernetes", "--help"]):
        out = noodle(env, *args)
        assert out.returncode == 0, (args, out.stderr[-2000:])


@pytest.mark.parametrize("spec", sorted(p.name for p in (ROOT / "specs").glob("*.yaml")))
def test_every_shipped_spec_solves_and_plots(env: dict[str, str], spec: str, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    out = noodle(env, "solve", f"specs/{spec}", "--out", str(plan))
    if spec in NEEDS_DEMO and not (ROOT / NEEDS_DEMO[spec]).exists():
        assert out.returncode != 0 and "no such profile file" in out.stderr and "Traceback" not in out.stderr
        return
    if spec == "infeasible.yaml":
        assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr[-2000:]
        return
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(plan.read_text())["stages"]
    png = tmp_path / "plan.png"
    drawn = noodle(env, "plot", str(plan), "--out", str(png))
    assert drawn.returncode == 0 and png.stat().st_size > 0, drawn.stderr[-2000:]


def test_cluster_and_deploy_commands_answer_without_the_extra(env: dict[str, str]) -> None:
    down = noodle(env, "cluster", "status", "--url", "http://127.0.0.1:9")
    assert down.returncode != 0 and "cannot reach http://127.0.0.1:9" in down.stderr and "Traceback" not in down.stderr
    rendered = noodle(env, "deploy", "kubernetes", "deploy/examples/cpu-only.yaml")
    assert rendered.returncode == 0 and "kind: StatefulSet" in rendered.stdout, rendered.stderr[-2000:]


@pytest.mark.parametrize("args", [["serve", "--model", "nowhere"], ["exec", "plan.json", "--model", "m"],
                                  ["worker", "--model", "m"], ["profile", "--preset", "gpt2-tiny"]])  # fmt: skip
def test_commands_that_need_the_extra_say_so_in_one_line(env: dict[str, str], args: list[str]) -> None:
    out = noodle(env, *args)
    assert out.returncode == 4, (out.returncode, out.stderr[-2000:])
    assert "noodle[exec]" in out.stderr and "Traceback" not in out.stderr
