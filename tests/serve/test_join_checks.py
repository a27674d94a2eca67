"""A join earns its place (issue 24, item 1), with real ``noodle serve --cluster`` and ``noodle worker --join`` processes.

* a worker whose unit table claims 0.001 ms per unit (its cost cache doctored: the real worker
  process reports it as its own) is timed on its own stage service before it is planned: its
  table is scaled by what the coordinator measured, in one event line;
* a second worker with a live worker's ``--name`` is refused (409) and exits with one line;
* a worker on a model folder with the same config and file sizes but other weights is refused.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx

from .servers import start_serve, wait_ready
from .test_cluster import TOKEN, _cluster, _processes, _wait, _worker


def _exits(proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> str:
    code = proc.wait(timeout=timeout_s)
    text = log.read_text(errors="replace")
    assert code != 0 and "Traceback" not in text, text
    return text


def _lying_cache(honest: Path, liar: Path, unit_ms: float) -> None:
    """``liar``: ``honest``'s cost cache with every unit's decode and prefill time replaced by ``unit_ms``."""
    shutil.copytree(honest, liar)
    (table,) = liar.glob("*.json")
    costs = json.loads(table.read_text())
    for u in costs["units"]:
        u["decode_ms"] = {b: unit_ms for b in u["decode_ms"]}
        u["prefill_ms_per_token"] = unit_ms
    costs["step_overhead_ms"] = {"decode_ms": 0.0, "prefill_ms": 0.0}
    table.write_text(json.dumps(costs))


def _other_weights(model_dir: Path, to: Path) -> None:
    """A copy of ``model_dir`` whose weights file has the same size and other bytes (a few flipped)."""
    shutil.copytree(model_dir, to)
    (weights,) = to.glob("*.safetensors")
    raw = bytearray(weights.read_bytes())
    header = int.from_bytes(raw[:8], "little") + 8
    for i in range(header + 64, header + 64 + 16):
        raw[i] ^= 0x55
    weights.write_bytes(bytes(raw))


def test_rogue_claims_are_timed_refused_or_corrected(model_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(model_dir), "--cluster", "--token", TOKEN, "--min-workers", "1", "--heartbeat-timeout", "3",
            "--served-model-name", "gpt2-tiny", "--probe-interval", "0"]  # fmt: skip
    honest_cache = tmp_path / "honest"
    with start_serve(args, ready=False) as sp, _processes() as procs:
        procs.append(_worker(model_dir, sp.base, "w1", honest_cache, tmp_path / "w1.log"))
        wait_ready(sp.base, timeout_s=240, proc=sp.proc)
        _wait(lambda: "node w1 claims" in sp.log(), 60, "w1's timed probe")
        line = next(ln for ln in sp.log().splitlines() if "node w1 claims" in ln)
        print("\n" + line)
        honest = next(n for n in _cluster(sp.base)["nodes"] if n["id"] == "w1")
        assert honest["verified"] and honest["correction"] == 1.0 and "its table is trusted" in line, line

        # the same name while w1 is alive: refused, and the worker ends with one line
        dup_log = tmp_path / "dup.log"
        dup = _worker(model_dir, sp.base, "w1", honest_cache, dup_log, join_timeout_s=3)
        procs.append(dup)
        text = _exits(dup, dup_log)
        assert "409" in text and "a live node is named 'w1'" in text, text
        assert [n["id"] for n in _cluster(sp.base)["nodes"]] == ["w1"]

        # other weights, same config and sizes: refused with a clear line
        other = tmp_path / "other-model"
        _other_weights(model_dir, other)
        assert [f.stat().st_size for f in other.glob("*")] == [f.stat().st_size for f in model_dir.glob("*")]
        bad_log = tmp_path / "bad.log"
        bad = _worker(other, sp.base, "w-other", tmp_path / "other-cache", bad_log)
        procs.append(bad)
        text = _exits(bad, bad_log)
        assert "same config and file sizes, other weights" in text, text

        # 0.001 ms per unit, claimed by a real worker: timed on it, and its table scaled before it is planned
        liar_cache = tmp_path / "liar"
        _lying_cache(honest_cache, liar_cache, 0.001)
        procs.append(_worker(model_dir, sp.base, "liar", liar_cache, tmp_path / "liar.log"))
        _wait(lambda: "node liar claims 0.001 ms" in sp.log(), 120, "the liar's timed probe")
        line = next(ln for ln in sp.log().splitlines() if "node liar claims 0.001 ms" in ln)
        assert "its table is scaled by" in line and "beyond x8" in line, line
        liar: dict[str, Any] = _wait(lambda: next((n for n in _cluster(sp.base)["nodes"]
                                                   if n["id"] == "liar" and n["verified"]), None), 30, "liar verified")
        assert liar["correction"] > 8.0, liar
        scaled_ms = liar["decode_ms"] * liar["correction"]
        print(f"\nliar: claimed {liar['decode_ms']:.3f} ms per step, scaled x{liar['correction']:.0f} to "
              f"{scaled_ms:.3f} ms; honest w1 claims {honest['decode_ms']:.3f} ms\n{line}")
        assert scaled_ms > honest["decode_ms"] / 4.0  # it is priced at about what it really takes, not 0
        export = httpx.get(f"{sp.base}/noodle/cluster/export", headers={"Authorization": f"Bearer {TOKEN}"},
                           timeout=30).text  # fmt: skip
        assert "liar" in export
