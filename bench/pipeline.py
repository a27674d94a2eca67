"""Pipelined execution: tokens/s against the plan's bound at 1..16 sequences in flight.

GPT-2 small (random weights) is profiled on this machine, then planned for a 3-node and a
4-node heterogeneous cluster (throughput objective; every node at most as fast as this
machine, memory forcing every node into use). Each plan runs, in one process:

* emulated (``LocalExecutor(emulate=True)``: every stage takes its planned time), at
  concurrency 1 (one sequence at a time: the baseline) up to 16 - once computing GPT-2 small
  itself under the sleeps ("emulated"), and once computing a narrow GPT-2 with the same 14
  units (64 wide) under the same planned times ("emulated-narrow"): its real compute is a
  millisecond, so what remains is the scheduler's and the emulation's own accuracy, whatever
  else loads this machine;
* on real loopback gRPC workers (one ``noodle worker`` process per stage, real compute on
  this machine's cores), same levels;
* time to first token of a 1,000-token prompt on the 4-stage plan, whole vs chunked
  prefill, alone and beside three decoding sequences (real compute, and emulated).

Prints tables and writes bench/results/pipeline.{json,csv,png}.

    python bench/pipeline.py [--threads 1] [--levels 1,2,3,4,6,8,16] [--no-grpc]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (id, compute_score, memory_gb). Scores well below 1 leave emulation slack: a stage's real compute
# on this shared 2-core machine, with every stage computing at once, must stay under its planned time.
NODES = {
    3: [("node-a", 0.3, 0.26), ("node-b", 0.25, 0.26), ("node-c", 0.2, 0.26)],
    4: [("node-a", 0.4, 0.3), ("node-b", 0.2, 0.22), ("node-c", 0.2, 0.22), ("node-d", 0.2, 0.22)],
}
SPEC = """\
name: gpt2-{n}-nodes
model: {{profile: profile}}
workload: {{prompt_tokens: {prompt}, max_new_tokens: {new}, batch_size: 1}}
cluster:
  nodes:
{nodes}
  links:
    default: {{bandwidth_gbps: 1.0, latency_ms: 0.5}}
objective: throughput
solver: {{name: auto, time_limit_s: 10}}
"""


def noodle(*args: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "noodle.cli.main", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"noodle {args[0]} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


def solve(work: Path, env: dict[str, str], n: int, prompt: int, new: int, mem_scale: float = 1.0) -> Path:
    nodes = "\n".join(f"    - {{id: {i}, device: cpu, memory_gb: {m * mem_scale:.3f}, compute_score: {s}}}" for i, s, m in NODES[n])
    spec = work / f"spec{n}-{prompt}.yaml"
    spec.write_text(SPEC.format(n=n, prompt=prompt, new=new, nodes=nodes))
    plan = work / f"plan{n}-{prompt}.json"
    noodle("solve", spec.name, "--out", plan.name, "--format", "json", cwd=work, env=env)
    return plan


def prompts_for(count: int, length: int, salt: int = 0) -> list[list[int]]:
    return [[(i * 7919 + j * 104729 + salt) % 50000 + 1 for j in range(length)] for i in range(count)]


def sweep(ex, plan: dict, levels: list[int], prompt: int, new: int, label: str) -> list[dict]:
    from noodle.executors.concurrent import run_concurrent

    rows = []
    for c in levels:
        prompts = prompts_for(max(4, 2 * c + 2), prompt, salt=c)
        rep = run_concurrent(ex, prompts, max_new_tokens=new, concurrency=c).report
        row = {
            "mode": label, "stages": len(plan["stages"]), "concurrency": c, "peak_in_flight": rep.peak_in_flight, "requests": len(prompts),
            "tokens_per_s": round(rep.tokens_per_s, 2), "plan_tokens_per_s": round(rep.predicted_tokens_per_s or 0, 2),
            "bound_tokens_per_s": round(1e3 / plan["predicted"]["bottleneck_ms"], 2),
            "of_bound": round(rep.tokens_per_s * plan["predicted"]["bottleneck_ms"] / 1e3, 3),
            "steady_tokens_per_s": None if rep.steady_tokens_per_s is None else round(rep.steady_tokens_per_s, 2),
            "steady_of_plan": None if not rep.steady_tokens_per_s else round(rep.steady_tokens_per_s / rep.predicted_tokens_per_s, 3),
            "ttft_ms_p50": round(rep.ttft_ms_p50 or 0, 1), "ttft_ms_p95": round(rep.ttft_ms_p95 or 0, 1),
            "itl_ms_p50": round(rep.itl_ms_p50 or 0, 2), "itl_ms_p95": round(rep.itl_ms_p95 or 0, 2),
            "busy": [round(s.busy_fraction or 0, 2) for s in rep.stages],
            "step_ms_p50": [round(s.decode_ms_p50 + s.hop_ms_p50, 1) for s in rep.stages],
            "planned_ms": [round(s.predicted_latency_ms or 0, 1) for s in rep.stages],
        }  # fmt: skip
        rows.append(row)
        print(f"{label:15s} {row['stages']} stages  c={c:2d} (peak {row['peak_in_flight']:2d})  {row['tokens_per_s']:7.2f} tok/s  plan {row['plan_tokens_per_s']:7.2f}"
              f"  bound {row['bound_tokens_per_s']:7.2f} ({row['of_bound']:.0%}; while full {row['steady_tokens_per_s']} = {row['steady_of_plan']} of plan)  TTFT p50 {row['ttft_ms_p50']:8.1f} ms"
              f"  ITL p50 {row['itl_ms_p50']:7.2f} p95 {row['itl_ms_p95']:7.2f}  busy {row['busy']}"
              f"  step {row['step_ms_p50']} vs planned {row['planned_ms']} ms", flush=True)  # fmt: skip
    base = rows[0]["tokens_per_s"] if rows and rows[0]["concurrency"] == 1 else None
    for r in rows:
        r["speedup_vs_one"] = round(r["tokens_per_s"] / base, 2) if base else None
    return rows


def ttft(ex, long_len: int, chunk: int, with_decoders: bool, label: str) -> dict:
    """TTFT of one long prompt (and the worst inter-token gap of three short sequences decoding beside it)."""
    from noodle.executors import Sampling

    pipe = ex.pipeline(concurrency=4, prefill_chunk=chunk)
    with pipe:
        shorts = []
        if with_decoders:
            shorts = [pipe.submit(p, max_new_tokens=40) for p in prompts_for(3, 8, salt=5)]
            time.sleep(0.5)  # they are decoding when the long prompt arrives
        h = pipe.submit(prompts_for(1, long_len, salt=9)[0], max_new_tokens=2, sampling=Sampling())
        long = h.result()
        gaps = [max(s.result().itl_s, default=0.0) for s in shorts]
    row = {"mode": label, "prompt_tokens": long_len, "prefill_chunk": chunk, "with_decoders": with_decoders,
           "ttft_ms": round((long.ttft_s or 0) * 1e3, 1),
           "decoders_max_gap_ms": round(max(gaps) * 1e3, 1) if gaps else None}  # fmt: skip
    print(f"TTFT {label:9s} {long_len} tokens, chunk {chunk:4d}, decoders {with_decoders!s:5s}: {row['ttft_ms']:8.1f} ms"
          + (f", worst gap of the decoders {row['decoders_max_gap_ms']:.1f} ms" if gaps else ""), flush=True)
    return row


def start_workers(n: int, model: Path, threads: int) -> tuple[list[subprocess.Popen], list[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NOODLE_TOKEN": "bench-token"}
    procs, addrs = [], []
    for _ in range(n):
        procs.append(subprocess.Popen([sys.executable, "-m", "noodle.cli.main", "worker", "--model", str(model), "--port", "0",
                                       "--threads", str(threads)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
    for p in procs:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = p.stdout.readline() if p.stdout else ""
            m = re.search(r"serving grpc on (\S+):(\d+)", line)
            if m:
                addrs.append(f"{m.group(1)}:{m.group(2)}")
                break
            if p.poll() is not None:
                raise SystemExit(f"worker exited: {line}")
    return procs, addrs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--levels", default="1,2,3,4,8,16")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--long-prompt", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--no-grpc", action="store_true")
    parser.add_argument("--only-ttft", action="store_true", help="keep the sweeps in --out/pipeline.json, redo TTFT")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    import torch

    torch.set_num_threads(args.threads)
    from noodle.executors.grpc.coordinator import GrpcExecutor
    from noodle.executors.local import LocalExecutor
    from noodle.plandoc import load_plan

    rows: list[dict] = []
    ttfts: list[dict] = []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="noodle-pipe-") as tmp:
        work = Path(tmp)
        print("model init gpt2 + profile ...", flush=True)
        noodle("model", "init", "--preset", "gpt2", "--out", "model", cwd=work, env=env)
        noodle("profile", "--model", "model", "--out", "profile", "--prompt-tokens", str(args.prompt_tokens),
               "--decode-tokens", "16", "--iterations", "10", "--warmup", "2", "--module-iterations", "0",
               "--no-dashboard", "--threads", str(args.threads), cwd=work, env=env)  # fmt: skip
        model = work / "model"
        from noodle.models import init_model

        narrow = init_model({"model_type": "gpt2", "n_layer": 12, "n_embd": 64, "n_head": 4, "n_positions": 1024,
                             "vocab_size": 50257}, work / "narrow", seed=0, tokenizer=False)  # fmt: skip
        plans = {} if args.only_ttft else {n: solve(work, env, n, args.prompt_tokens, args.new_tokens) for n in (3, 4)}
        if args.only_ttft:
            rows = json.loads((args.out / "pipeline.json").read_text())["rows"]
        for n, path in plans.items():
            doc = load_plan(path)
            plan = json.loads(path.read_text())
            print(f"{n}-node plan: " + ", ".join(f"{s.node} [{s.start},{s.end}) {s.expected_latency_ms:.1f} ms" for s in doc.stages)
                  + f" | bound {1e3 / doc.predicted.bottleneck_ms:.2f} tok/s, one at a time {1e3 / doc.predicted.token_latency_ms:.2f}")
            with LocalExecutor(doc, narrow, emulate=True, log=lambda _: None) as ex:
                rows += sweep(ex, plan, levels, args.prompt_tokens, args.new_tokens, "emulated-narrow")
            with LocalExecutor(doc, model, emulate=True, log=lambda _: None) as ex:
                rows += sweep(ex, plan, levels, args.prompt_tokens, args.new_tokens, "emulated")
            save(args, rows, ttfts, load)
            if not args.no_grpc:
                procs, addrs = start_workers(len(doc.stages), model, args.threads)
                try:
                    workers = {s.node: a for s, a in zip(doc.stages, addrs)}
                    with GrpcExecutor(doc, model, workers=workers, token="bench-token", log=lambda _: None) as ex:
                        rows += sweep(ex, plan, levels, args.prompt_tokens, args.new_tokens, "grpc")
                finally:
                    for p in procs:
                        p.kill()
                        p.wait()
                save(args, rows, ttfts, load)
        long_plan = load_plan(solve(work, env, 4, args.long_prompt, 16, mem_scale=1.3))
        for emulate in (False, True):
            label = "emulated" if emulate else "real"
            with LocalExecutor(long_plan, model, emulate=emulate, log=lambda _: None) as ex:
                for decoders in (False, True):
                    for chunk in (0, args.chunk):
                        ttfts.append(ttft(ex, args.long_prompt, chunk, decoders, label))

    save(args, rows, ttfts, load)
    print(f"wrote {args.out / 'pipeline.json'}, .csv, .png")


def save(args: argparse.Namespace, rows: list[dict], ttfts: list[dict], load: float) -> None:
    """Write what was measured so far (a long run that stops early still leaves its results)."""
    if not rows:
        return
    result = {"benchmark": "pipeline", "model": "gpt2 (124M, random weights)", "threads": args.threads,
              "load_avg_at_start": round(load, 2), "load_avg_at_end": round(os.getloadavg()[0], 2),
              "cpus": os.cpu_count(), "nodes": NODES, "rows": rows, "ttft": ttfts}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    with (args.out / "pipeline.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, args.out / "pipeline.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"emulated-narrow": ("^-", "tab:blue"), "emulated": ("o-", "tab:orange"), "grpc": ("s--", "tab:green")}
    for ax, n in zip(axes, (3, 4)):
        for mode, (style, color) in styles.items():
            sel = [r for r in rows if r["stages"] == n and r["mode"] == mode]
            if not sel:
                continue
            xs = [r["concurrency"] for r in sel]
            steady = [r.get("steady_tokens_per_s") or r["tokens_per_s"] for r in sel]
            label = "grpc workers (this machine's real speed)" if mode == "grpc" else f"{mode}, while full"
            ax.plot(xs, steady, style, color=color, label=label)
            ax.plot(xs, [r["tokens_per_s"] for r in sel], ":", color=color, alpha=0.5, lw=1)
        sel = [r for r in rows if r["stages"] == n and r["mode"] == "emulated"] or [r for r in rows if r["stages"] == n]
        if sel:
            ax.plot([r["concurrency"] for r in sel], [r["plan_tokens_per_s"] for r in sel], "--", color="gray", lw=1,
                    label="plan b*min(G/L, 1/B)")  # fmt: skip
            ax.axhline(sel[0]["bound_tokens_per_s"], color="red", lw=0.8, label="plan bound 1/bottleneck")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequences in flight (dotted: tokens/s over the whole run)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"GPT-2 small, {n}-stage heterogeneous plan")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
