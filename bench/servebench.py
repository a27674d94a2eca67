"""``noodle bench serve``: streaming clients at 1..32 concurrency against ``noodle serve --emulate``.

The server runs as a subprocess on a model built from a preset (random weights), serving
the plan the solver makes for an emulated three-node home lab (a GPU desktop, a laptop
iGPU, a CPU NAS; their speeds are multiples of a slow reference device so that a step takes
milliseconds, not microseconds). Each level reports requests/s, output tokens/s, TTFT and
ITL p50/p95/p99 next to the tokens/s the plan predicts for that many sequences in flight,
and the results go to ``serve.{json,csv,png}``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.loadgen import LevelResult, run_level, summarize

__all__ = ["bench_spec", "launch_serve", "run_serve_bench", "PROMPTS"]

PROMPTS = [
    "The planner measures every layer and",
    "Once upon a time there was a model that",
    "def forward(self, hidden_states):",
    "A desktop GPU, a laptop and a NAS each hold",
    "The quick brown fox jumps over",
    "Hello world! The executor then runs",
]
_LINE = re.compile(r"on http://127\.0\.0\.1:(\d+)/v1")


def bench_spec(config_path: Path) -> dict[str, Any]:
    """The emulated heterogeneous cluster the benchmark serves (a spec mapping)."""
    return {
        "name": "serve-bench-home-lab",
        "model": {"hf_config": str(config_path), "reference": {"tflops": 0.005, "mem_bandwidth_gbps": 0.1}},
        # micro-batch 1: each step carries one sequence, so the plan's step times are for batch 1
        "workload": {"prompt_tokens": 64, "max_new_tokens": 64, "batch_size": 1},
        "cluster": {
            "nodes": [
                {"id": "desktop-gpu", "device": "gpu", "memory_gb": 8, "compute_score": 4.0},
                {"id": "laptop-igpu", "device": "igpu", "memory_gb": 4, "compute_score": 2.0},
                {"id": "nas-cpu", "device": "cpu", "memory_gb": 16, "compute_score": 1.0},
            ],
            "links": {"default": {"bandwidth_gbps": 1.0, "latency_ms": 0.3}},
        },
        "objective": "throughput",
        "solver": {"name": "auto", "time_limit_s": 5.0},
    }


@contextlib.contextmanager
def launch_serve(args: Sequence[str], *, timeout_s: float = 180.0) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``noodle serve ARGS --port 0`` on 127.0.0.1 until ``/readyz`` is 200; SIGTERM (then kill) on exit."""
    log = tempfile.NamedTemporaryFile(prefix="noodle-bench-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "noodle.cli.main", "serve", *args, "--host", "127.0.0.1",
                             "--port", "0"], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    base = ""
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = Path(log.name).read_text(errors="replace")
            if proc.poll() is not None:
                raise RuntimeError(f"noodle serve exited with {proc.returncode}:\n{text[-2000:]}")
            m = _LINE.search(text)
            if m and not base:
                base = f"http://127.0.0.1:{m.group(1)}"
            if base:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"noodle serve not ready after {timeout_s:g} s")
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()
        os.unlink(log.name)


def _plot(rows: list[LevelResult], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r.concurrency for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(c, [r.output_tokens_per_s for r in rows], "o-", label="measured output tokens/s")
    if all(r.predicted_tokens_per_s for r in rows):
        a.plot(c, [r.predicted_tokens_per_s for r in rows], "s--", label="plan's prediction")
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrent streaming clients")
    a.set_ylabel("tokens/s")
    a.set_title("throughput")
    a.legend()
    for key, style in (("ttft", "o-"), ("itl", "s-")):
        b.plot(c, [getattr(r, f"{key}_ms_p50") for r in rows], style, label=f"{key.upper()} p50")
        b.plot(c, [getattr(r, f"{key}_ms_p95") for r in rows], style.replace("-", ":"), label=f"{key.upper()} p95")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("concurrent streaming clients")
    b.set_ylabel("ms")
    b.set_title("latency")
    b.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_serve_bench(preset: str, levels: Sequence[int], duration_s: float, max_tokens: int, threads: int,
                    out: Path) -> list[LevelResult]:  # fmt: skip
    """Run every level against a fresh emulated server; print a table; write serve.{json,csv,png} in ``out``."""
    from rich.console import Console
    from rich.table import Table

    from noodle.executors.scheduler import predicted_tokens_per_s
    from noodle.models import init_model
    from noodle.plandoc import plan_document
    from noodle.solvers import solve
    from noodle.spec import parse_spec

    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="noodle-bench-serve-") as tmp:
        model = init_model(preset, Path(tmp) / preset, seed=0)
        data = bench_spec(model / "config.json")
        spec_path = Path(tmp) / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
        spec = parse_spec(data)
        problem = spec.to_problem(tmp)
        doc = plan_document(problem, solve(problem, solver="auto", time_limit_s=5.0))
        args = ["--model", str(model), "--spec", str(spec_path), "--emulate", "--concurrency", str(max(levels)),
                "--max-queue", "1024", "--threads", str(threads)]  # fmt: skip
        rows: list[LevelResult] = []
        with launch_serve(args) as (base, _proc):
            run_level(base, model.name, 1, duration_s=1.0, max_tokens=4, prompts=PROMPTS)  # warm-up
            for c in levels:
                records, wall = run_level(base, model.name, c, duration_s=duration_s, max_tokens=max_tokens,
                                          prompts=PROMPTS)  # fmt: skip
                pred = predicted_tokens_per_s(doc.predicted.token_latency_ms, doc.predicted.bottleneck_ms, c)
                rows.append(summarize(c, records, wall, pred))
                console.print(f"concurrency {c}: {rows[-1].output_tokens_per_s:.1f} tokens/s", style="dim")
    load_after = os.getloadavg()
    table = Table(title=f"noodle serve: {preset} on an emulated {len(doc.stages)}-stage plan, {max_tokens} tokens/request")
    cols = ("clients", "req/s", "tokens/s", "planned tok/s", "TTFT p50", "p95", "p99", "ITL p50", "p95", "p99", "errors")
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r.concurrency), f"{r.requests_per_s:.2f}", f"{r.output_tokens_per_s:.1f}",
                      f"{r.predicted_tokens_per_s or 0:.1f}", *(f"{getattr(r, k):.1f}" for k in (
                          "ttft_ms_p50", "ttft_ms_p95", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p95", "itl_ms_p99")),
                      str(r.errors))  # fmt: skip
    console.print(table)
    console.print(f"TTFT/ITL in ms; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
                  f"({os.cpu_count()} CPUs); plan: " + ", ".join(f"{s.node} {s.layers[0]}..{s.layers[-1]} "
                  f"{s.expected_latency_ms:.2f} ms" for s in doc.stages))  # fmt: skip
    meta = {
        "preset": preset, "duration_s": duration_s, "max_tokens": max_tokens, "threads": threads,
        "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
        "plan": {"stages": [{"node": s.node, "units": s.layers, "planned_ms": s.expected_latency_ms} for s in doc.stages],
                 "token_latency_ms": doc.predicted.token_latency_ms, "bottleneck_ms": doc.predicted.bottleneck_ms},
    }  # fmt: skip
    (out / "serve.json").write_text(json.dumps({"meta": meta, "levels": [r.as_dict() for r in rows]}, indent=2) + "\n")
    with open(out / "serve.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0].as_dict()))
        writer.writeheader()
        writer.writerows(r.as_dict() for r in rows)
    _plot(rows, f"noodle serve ({preset}, emulated {len(doc.stages)}-stage home lab, {max_tokens} tokens/request)",
          out / "serve.png")  # fmt: skip
    console.print(f"results written to {out}/serve.{{json,csv,png}}")
    return rows
