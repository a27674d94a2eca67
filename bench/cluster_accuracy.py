"""Per-stage prediction error of a joined cluster after 10 requests (issue 13, item 7).

Starts ``noodle serve --cluster`` and three ``noodle worker --join`` processes on 127.0.0.1
(each times the model's units on join; nothing is written by hand), sends 10 greedy
requests (two at a time), then reads ``/noodle/cluster``: for every stage, the worker's own
compute time of its last window of decode steps (median) against (a) the join-time unit
table, (b) the corrected estimate before that window (the adaptive cost table, one window
ahead) and (c) the prediction of the plan in force. Prints a table and writes
``bench/results/cluster_accuracy.{json,md}``.

    python bench/cluster_accuracy.py [--preset gpt2] [--requests 10] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-cluster-token"


def _noodle(*args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NOODLE_TOKEN": TOKEN}
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "noodle.cli.main", *args], stdout=out, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT)  # fmt: skip


def _wait(cond: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = cond()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise SystemExit(f"timed out after {timeout_s} s waiting for {what}")


def run(preset: str, requests: int, max_tokens: int, port: int, work: Path, stagger: bool = True) -> dict[str, Any]:
    model = work / preset
    subprocess.run([sys.executable, "-m", "noodle.cli.main", "model", "init", "--preset", preset, "--out", str(model)],
                   check=True, capture_output=True, cwd=ROOT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    procs = [_noodle("serve", "--model", str(model), "--cluster", "--token", TOKEN, "--port", str(port), "--min-workers",
                     "3", "--concurrency", "4", "--threads", "1", "--served-model-name", preset, log=work / "serve.log")]  # fmt: skip
    try:
        for i in range(3):
            procs.append(_noodle("worker", "--model", str(model), "--port", "0", "--join", base, "--name", f"w{i}",
                                 "--cache-dir", str(work / f"cache{i}"), "--threads", "1", log=work / f"w{i}.log"))  # fmt: skip
            if stagger:  # one measures at a time, as on separate machines (here they share 2 cores)
                _wait(lambda: len(httpx.get(f"{base}/noodle/cluster", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).json()["nodes"]) > i, 600, f"w{i}")
        t0 = time.monotonic()
        _wait(lambda: httpx.get(f"{base}/readyz", timeout=5).status_code == 200, 600, "the first plan")
        ready_s = time.monotonic() - t0
        start = httpx.get(f"{base}/noodle/cluster", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()

        def one(k: int) -> int:
            body = {"model": preset, "prompt": f"Request {k}: the planner measures", "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=600)
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        t1 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            tokens = sum(pool.map(one, range(requests)))
        serve_s = time.monotonic() - t1
        time.sleep(2.5)  # the last window is fed within a second
        status = httpx.get(f"{base}/noodle/cluster", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
        events = httpx.get(f"{base}/noodle/status", timeout=10).json().get("events", [])
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    stages = []
    for e in status.get("prediction", []):
        table = e["corrected_ms"] / e["correction"]
        stages.append({**e, "table_ms": table, "table_error_pct": 100 * (e["measured_ms"] / table - 1)})
    return {"preset": preset, "stagger": stagger, "requests": requests, "max_tokens": max_tokens, "tokens": tokens,
            "ready_s": ready_s, "serve_s": serve_s, "plan_at_start": start["plan"], "plan": status["plan"],
            "replans": [{k: r[k] for k in ("reason", "before", "after", "before_tps", "after_tps")} for r in status["replans"]],
            "drift_events": [e["message"] for e in events if "drift:" in e["message"] and "keep" in e["message"]],
            "stages": stages, "cpu_count": os.cpu_count()}  # fmt: skip


def _markdown(res: dict[str, Any]) -> str:
    lines = [f"# Cluster prediction error after {res['requests']} requests ({res['preset']}, 3 workers on 127.0.0.1)", "",
             f"workers {'joined one after another' if res['stagger'] else 'started together (they measured concurrently)'}; "
             f"plan {res['plan']}; {res['tokens']} tokens in {res['serve_s']:.1f} s; machine: {res['cpu_count']} cores, "
             "shared; 1 torch thread per process", "",
             "| stage | node | units | measured ms | join-time table ms (error) | corrected estimate error | plan's prediction ms (error) | correction |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in res["stages"]:
        lines.append(f"| {s['stage']} | {s['node']} | {s['units']} | {s['measured_ms']:.3f} | {s['table_ms']:.3f} "
                     f"({s['table_error_pct']:+.1f} %) | {s['corrected_error_pct']:+.1f} % | {s['predicted_ms']:.3f} "
                     f"({s['error_pct']:+.1f} %) | x{s['correction']:.3f} |")  # fmt: skip
    lines += ["", "Re-plans: " + "; ".join(f"{r['reason']}: {r['before']} -> {r['after']}" for r in res["replans"]), "",
              "Drift re-solves that kept the layout (predictions corrected): " + ("; ".join(res["drift_events"]) or "none"), ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=18431)
    parser.add_argument("--together", action="store_true", help="start the workers at once (they measure concurrently)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="noodle-cluster-accuracy-") as tmp:
        res = run(args.preset, args.requests, args.max_tokens, args.port, Path(tmp), stagger=not args.together)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cluster_accuracy.json").write_text(json.dumps(res, indent=1) + "\n")
    md = _markdown(res)
    (args.out / "cluster_accuracy.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
