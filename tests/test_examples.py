"""The examples run as users run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_custom_cost_model_example_changes_the_plan():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_cost_model.py")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "->" in line]
    assert len(lines) == 2 and "default" in lines[0] and "measured-overheads" in lines[1]
    assert lines[0].split("->")[1] != lines[1].split("->")[1]  # the custom model moved a cut
