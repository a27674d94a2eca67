"""Time-limit and memory adherence of every solver, set-up included, at growing sizes.

Each run is one subprocess that calls :func:`noodle.solve` (cost tables, warm start,
bound, model building and search all inside the measured wall time) on a seeded
Llama-shaped chain (identical blocks, ``tests/solvers/instances.llama_like_units``)
over a heterogeneous cluster (:func:`bench.generate.random_instance`). It
records the wall time against the limit (target: <= limit + 10 %), the peak RSS of the
process, the objective, and the objective of ``--solver heuristic`` on the same
instance (an exact solver must never be worse: it is warm-started from the heuristic).
Writes ``bench/results/solver_limits.json``.

    python bench/solver_limits.py [--limit 5] [--sizes 50x8,130x64,258x128]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench` as a package

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from noodle import solve
from bench.generate import random_instance
from tests.solvers.instances import llama_like_units
units, nodes, objective, solver, limit = {units}, {nodes}, {objective!r}, {solver!r}, {limit}
p = random_instance(0, units=llama_like_units(units - 2), n_nodes=nodes, objective=objective)
t0 = time.perf_counter()
r = solve(p, solver=solver, time_limit_s=limit)
wall = time.perf_counter() - t0
print(json.dumps({{"wall_s": wall, "objective_ms": r.objective_ms, "status": r.status, "solver": r.solver,
                  "note": r.note, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def run_one(units: int, nodes: int, objective: str, solver: str, limit: float) -> dict:
    code = CHILD.format(root=str(ROOT), units=units, nodes=nodes, objective=objective, solver=solver, limit=limit)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10 * limit + 60,
                             env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"killed after {10 * limit + 60:g} s"}
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=5.0)
    parser.add_argument("--sizes", default="50x8,130x64,258x128", help="units x nodes, comma-separated")
    parser.add_argument("--solvers", default="heuristic,auto,cpsat,milp")
    parser.add_argument("--objectives", default="throughput,latency")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "solver_limits.json")
    args = parser.parse_args()
    rows = []
    print(f"{'size':>8} {'objective':>10} {'solver':>10} {'wall s':>7} {'/limit':>7} {'RSS MB':>7} "
          f"{'objective':>10} {'vs heur':>8}  note")
    for size in args.sizes.split(","):
        units, nodes = (int(x) for x in size.split("x"))
        for objective in args.objectives.split(","):
            heur = None
            for solver in args.solvers.split(","):
                r = run_one(units, nodes, objective, solver, args.limit)
                r.update(units=units, nodes=nodes, objective=objective, solver_name=solver, limit_s=args.limit)
                if solver == "heuristic":
                    heur = r.get("objective_ms")
                r["vs_heuristic"] = (r["objective_ms"] / heur if heur and r.get("objective_ms") else None)
                rows.append(r)
                if "error" in r:
                    print(f"{size:>8} {objective:>10} {solver:>10}  error: {r['error']}")
                    continue
                vs = f"{r['vs_heuristic']:.4f}" if r["vs_heuristic"] else "-"
                print(f"{size:>8} {objective:>10} {solver:>10} {r['wall_s']:7.2f} {r['wall_s'] / args.limit:7.2f} "
                      f"{r['peak_rss_mb']:7.0f} {r['objective_ms']:10.4f} {vs:>8}  {r['note'][:60]}")
    ok = [r for r in rows if "error" not in r]
    summary = {
        "runs": len(rows), "errors": len(rows) - len(ok),
        "worst_wall_over_limit": max((r["wall_s"] / r["limit_s"] for r in ok), default=None),
        "within_limit_plus_10pct": sum(r["wall_s"] <= 1.1 * r["limit_s"] for r in ok),
        "peak_rss_mb_max": max((r["peak_rss_mb"] for r in ok), default=None),
        "worse_than_heuristic": sum(1 for r in ok if r["vs_heuristic"] and r["vs_heuristic"] > 1 + 1e-9),
    }
    print(json.dumps(summary))
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other engineers' test runs "
                       "(timings noisy)", "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
