"""Planned vs measured per stage: profile GPT-2 small here, solve for three CPU nodes, run the plan.

The whole user path through the CLI: ``noodle model init`` -> ``noodle profile``
-> ``noodle solve`` -> ``noodle exec --emulate --format json``. Every node has
compute_score 1.0 (this machine is the profile's reference device), so emulation
stretches nothing and only sleeps the planned links; memory limits force three
stages. Prints a table and writes bench/results/exec_prediction.{json,csv,png}.

    python bench/exec_prediction.py [--preset gpt2] [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SPEC = """\
name: {preset}-three-cpus
model: {{profile: profile}}
workload: {{prompt_tokens: {prompt}, max_new_tokens: {new}, batch_size: 1}}
cluster:
  nodes:
    - {{id: cpu-a, device: cpu, memory_gb: {mem}, compute_score: 1.0}}
    - {{id: cpu-b, device: cpu, memory_gb: {mem}, compute_score: 1.0}}
    - {{id: cpu-c, device: cpu, memory_gb: {mem}, compute_score: 1.0}}
  links:
    default: {{bandwidth_gbps: 1.0, latency_ms: 0.5}}
objective: latency
solver: {{name: auto, time_limit_s: 10}}
"""


def noodle(*args: str, cwd: Path, env: dict[str, str]) -> str:
    cmd = [sys.executable, "-m", "noodle.cli.main", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--memory-gb", type=float, default=0.22, help="per node; small enough to force 3 stages")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}

    with tempfile.TemporaryDirectory(prefix="noodle-pred-") as tmp:
        work = Path(tmp)
        print(f"model init {args.preset} ...", flush=True)
        noodle("model", "init", "--preset", args.preset, "--out", "model", cwd=work, env=env)
        print("profile ...", flush=True)
        noodle("profile", "--model", "model", "--out", "profile", "--prompt-tokens", str(args.prompt_tokens),
               "--decode-tokens", "16", "--iterations", "20", "--warmup", "3", "--module-iterations", "0",
               "--no-dashboard", cwd=work, env=env)  # fmt: skip
        (work / "spec.yaml").write_text(
            SPEC.format(preset=args.preset, prompt=args.prompt_tokens, new=args.new_tokens, mem=args.memory_gb)
        )
        print("solve ...", flush=True)
        noodle("solve", "spec.yaml", "--out", "plan.json", "--format", "json", cwd=work, env=env)
        plan = json.loads((work / "plan.json").read_text())
        prompt = ",".join(str((i * 7919) % 50000) for i in range(1, args.prompt_tokens + 1))
        print("exec ...", flush=True)
        run = json.loads(noodle("exec", "plan.json", "--model", "model", "--prompt-ids", prompt, "--max-new-tokens",
                                str(args.new_tokens), "--emulate", "--format", "json", "--threads", str(args.threads),
                                cwd=work, env=env))  # fmt: skip

    report = run["report"]
    rows = []
    for st, planned in zip(report["stages"], plan["stages"]):
        rows.append({
            "stage": st["stage_id"], "node": st["node"], "units": st["units"],
            "planned_compute_ms": planned["compute_ms"], "measured_compute_ms": st["decode_ms_p50"],
            "compute_error_pct": st["compute_error_pct"],
            "planned_latency_ms": planned["expected_latency_ms"], "measured_latency_ms": st["measured_latency_ms"],
            "latency_error_pct": st["latency_error_pct"],
        })  # fmt: skip
    result = {
        "benchmark": "exec_prediction", "model": args.preset, "threads": args.threads, "solver": plan["solver"],
        "planned_token_latency_ms": plan["predicted"]["token_latency_ms"],
        "measured_token_latency_ms": report["decode_ms_p50"], "token_latency_error_pct": report["token_latency_error_pct"],
        "stages": rows,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "exec_prediction.json").write_text(json.dumps(result, indent=2) + "\n")
    with (args.out / "exec_prediction.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        print(f"stage {r['stage']} {r['node']:6s} {r['units']:22s} compute planned {r['planned_compute_ms']:7.2f} "
              f"measured {r['measured_compute_ms']:7.2f} ({r['compute_error_pct']:+.1f}%)  latency planned "
              f"{r['planned_latency_ms']:7.2f} measured {r['measured_latency_ms']:7.2f} ({r['latency_error_pct']:+.1f}%)")  # fmt: skip
    print(f"token latency planned {result['planned_token_latency_ms']:.2f} ms, measured "
          f"{result['measured_token_latency_ms']:.2f} ms ({result['token_latency_error_pct']:+.1f}%)")  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["planned_latency_ms"] for r in rows], 0.4, label="planned (plan.json)")
    ax.bar([x + 0.2 for x in xs], [r["measured_latency_ms"] for r in rows], 0.4, label="measured (noodle exec)")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['latency_error_pct']:+.0f}%", (x + 0.2, r["measured_latency_ms"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [f"{r['node']}\n{r['units']}" for r in rows], fontsize=8)
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"{args.preset}: planned vs measured stage latency (profile -> solve -> exec)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "exec_prediction.png", dpi=120)
    print(f"wrote {args.out / 'exec_prediction.json'}, .csv, .png")


if __name__ == "__main__":
    main()
