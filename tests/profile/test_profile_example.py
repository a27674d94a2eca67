"""examples/profile_gpt2.py runs the whole workflow (tiny preset, in-process to keep it quick)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "profile_gpt2.py"


def test_profile_example_runs_end_to_end(tmp_path, monkeypatch, capsys):
    out = tmp_path / "prof"
    argv = [str(EXAMPLE), "--preset", "gpt2-tiny", "--models", str(tmp_path / "models"), "--out", str(out),
            "--warmup", "1", "--iterations", "2", "--prompt-tokens", "8", "--decode-tokens", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    text = capsys.readouterr().out
    assert text.count("bottleneck ") == 3
    assert "coverage: units 100.0%" in text and "6 units" in text
    assert (tmp_path / "models" / "gpt2-tiny" / "config.json").exists()
    for name in ("metrics.jsonl", "units.json", "summary.json", "dashboard.html", "summary.png"):
        assert (out / name).exists(), name
