"""The status page in a real browser (headless Chromium), in cluster mode, after a worker holding a stage is killed.

The page is loaded from a live ``noodle serve --cluster`` with three joined workers under load, one of them
SIGKILLed and re-planned around; Chromium runs its script and the rendered DOM is read back (``--dump-dom``):
the dead worker is said dead (not "spare"), and the completed count survives the re-plan, and the in-flight line has its own axis (it reaches the top of
the chart instead of being drawn, squashed or clipped, on the tokens/s scale).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from bench.cluster import ClusterLab, Load, _stages, measure_cache, wait_for

pytestmark = pytest.mark.slow

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
H, PAD = 180, 24  # the chart's viewBox height and padding (status.html)


def render(url: str, tmp: Path) -> str:
    """The page's DOM after its script ran for a few (virtual) seconds in headless Chromium."""
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          f"--user-data-dir={tmp / 'chromium'}", "--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _row_of(dom: str, node: str) -> str:
    rows = re.findall(r"<tr>(.*?)</tr>", re.search(r'<tbody id="nodes">(.*?)</tbody>', dom, re.S).group(1), re.S)
    return next(r for r in rows if r.startswith(f"<td>{node}</td>"))


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install -y chromium)")
def test_status_page_after_a_kill_in_chromium(model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "costs"
    measure_cache(model_dir, cache)
    with ClusterLab(model_dir, tmp_path / "lab", ["--min-workers", "3", "--heartbeat-timeout", "5",
                                                  "--concurrency", "4"]) as lab:  # fmt: skip
        for name in ("w1", "w2", "w3"):
            lab.worker(name, cache)
        lab.wait_ready()
        with Load(lab.base) as load:
            wait_for(lambda: len(load.done) >= 4, 90, "requests to complete")
            victim = _stages(lab.cluster()["plan"])[-1]["node"]
            t_kill = lab.kill(victim)
            left = wait_for(lambda: [r for r in lab.replans(t_kill) if victim in r["reason"]], 60, "a re-plan")[0]
            wait_for(lambda: load.first_after(left["t"]), 60, "a request on the new plan")
        finished = len(load.done)
        wait_for(lambda: not next(n for n in lab.cluster()["nodes"] if n["id"] == victim)["alive"], 30, "dead")
        time.sleep(1.5)  # one more status sample after the load stopped
        dom = render(f"{lab.base}/", tmp_path)
    (tmp_path / "status.html").write_text(dom)  # for a look after a failure
    assert 'class="state ready"' in dom, dom[:2000]
    # completed requests count the server's life, not the pipeline's since the re-plan
    assert float(re.search(r'<div class="v" id="done">([0-9.,]+)</div>', dom).group(1).replace(",", "")) >= finished
    row = _row_of(dom, victim)
    assert "dead" in row and "spare" not in row and "none (dead)" in row, row
    # a live worker is never shown dead (the re-plan may leave one spare: on two nodes the model can fit on one)
    assert "dead" not in _row_of(dom, next(n for n in ("w1", "w2", "w3") if n != victim))
    # each stage's hop is measured over gRPC (the call's round trip beyond the worker's compute), not 0.000
    stage_rows = re.findall(r"<tr>(.*?)</tr>", re.search(r'<tbody id="stages">(.*?)</tbody>', dom, re.S).group(1), re.S)
    hops = [float(re.findall(r"<td[^>]*>([^<]*)</td>", r)[6]) for r in stage_rows]
    assert stage_rows and all(h > 0 for h in hops), hops
    prediction = re.search(r'<tbody id="prediction">(.*?)</tbody>', dom, re.S).group(1)
    assert "<tr>" in prediction, "the stage-compute table (measured vs predicted) is empty"
    line = re.search(r'<path id="inflight-line" d="([^"]+)"', dom)
    assert line, "no in-flight line on the chart"
    ys = [float(y) for y in re.findall(r"[ML][0-9.]+,([0-9.]+)", line.group(1))]
    assert all(PAD - 0.5 <= y <= H - PAD + 0.5 for y in ys), ys  # inside the plot, never past an axis
    # its own axis: the busiest sample sits at the top of the in-flight scale (max x 1.1), not on the tokens/s one
    assert min(ys) == pytest.approx(H - PAD - (H - 2 * PAD) / 1.1, abs=0.2), ys
    fmax = float(re.search(r'<text id="fmax"[^>]*>([0-9.]+)</text>', dom).group(1))
    assert 1.0 < fmax <= 4 * 1.1 + 0.05  # --concurrency 4: at most 4 sequences in flight
