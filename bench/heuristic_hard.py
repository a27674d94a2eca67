"""Heuristic quality on hard random instances, against the exact optimum (set DP).

Instances: ``tests/solvers/instances.random_problem`` (seeded) with 10-14 units, 5-6
nodes, binding memory (each node holds 30-90 % of the model) and uneven links (half the
pairs get their own bandwidth 0.5-20 Gb/s and latency 0.05-2 ms), both objectives.
A second tier (``--tier wide``: 20-40 units, 8-10 nodes) is where the heuristic's
exact-DP shortcut does not reach. Prints a summary and writes
``bench/results/heuristic_hard.json``.

    python bench/heuristic_hard.py [--instances 110] [--wide-instances 60] [--tier hard|wide|both]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noodle.graph.costmodel import DefaultCostModel, evaluate  # noqa: E402
from noodle.solvers.search.heuristic import HeuristicSolver  # noqa: E402
from noodle.solvers.exact.subsetdp import solve_subset_dp  # noqa: E402
from noodle.solvers.tables import build_tables  # noqa: E402
from tests.solvers.instances import random_problem  # noqa: E402

TIERS = {"hard": ((10, 14), (5, 6)), "wide": ((20, 40), (8, 10))}


def run_tier(tier: str, count: int, time_limit: float) -> dict:
    (ulo, uhi), (mlo, mhi) = TIERS[tier]
    cm = DefaultCostModel()
    rows = []
    for seed in range(count):
        rng = random.Random(10_000 + seed)
        objective = ("throughput", "latency")[seed % 2]
        p = random_problem(10_000 + seed, n_units=rng.randint(ulo, uhi), n_nodes=rng.randint(mlo, mhi),
                           objective=objective, tight=True)
        tables = build_tables(p, cm)
        opt, _ = solve_subset_dp(tables, objective)
        if opt == float("inf"):
            rows.append({"seed": 10_000 + seed, "units": p.num_units, "nodes": len(p.cluster.nodes),
                         "objective": objective, "feasible": False})
            continue
        t0 = time.perf_counter()
        res = HeuristicSolver().solve(p, tables, time_limit_s=time_limit)
        wall = time.perf_counter() - t0
        value = evaluate(p, res.plan, cm).objective_ms if res.plan is not None else None
        gap = None if value is None else (value - opt) / opt
        rows.append({"seed": 10_000 + seed, "units": p.num_units, "nodes": len(p.cluster.nodes),
                     "objective": objective, "feasible": True, "optimum_ms": opt, "heuristic_ms": value,
                     "gap": gap, "seconds": wall, "note": res.note})
    solved = [r for r in rows if r["feasible"]]
    gaps = [r["gap"] if r["gap"] is not None else float("inf") for r in solved]
    times = [r["seconds"] for r in solved]
    return {
        "tier": tier, "units": [ulo, uhi], "nodes": [mlo, mhi], "instances": len(rows), "feasible": len(solved),
        "missed_plan": sum(r["heuristic_ms"] is None for r in solved),
        "worst_gap": max(gaps) if gaps else None, "median_gap": statistics.median(gaps) if gaps else None,
        "above_0.1%": sum(g > 1e-3 for g in gaps), "above_5%": sum(g > 0.05 for g in gaps),
        "median_s": statistics.median(times) if times else None, "max_s": max(times) if times else None,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=110, help="hard-tier instances")
    parser.add_argument("--wide-instances", type=int, default=60)
    parser.add_argument("--tier", default="both", choices=["hard", "wide", "both"])
    parser.add_argument("--time-limit", type=float, default=10.0, help="heuristic's limit (it stops sooner)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "heuristic_hard.json")
    args = parser.parse_args()
    tiers = ["hard", "wide"] if args.tier == "both" else [args.tier]
    results = [run_tier(t, args.instances if t == "hard" else args.wide_instances, args.time_limit)
               for t in tiers]
    for r in results:
        print(f"{r['tier']:5s} {r['units']} units x {r['nodes']} nodes: {r['feasible']}/{r['instances']} feasible, "
              f"missed {r['missed_plan']}, worst gap {r['worst_gap']:.2%}, median {r['median_gap']:.2%}, "
              f"{r['above_0.1%']} above 0.1 %, {r['above_5%']} above 5 %; median {r['median_s'] * 1e3:.0f} ms, "
              f"max {r['max_s'] * 1e3:.0f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other engineers' tests",
            "python": platform.python_version(), "time_limit_s": args.time_limit}
    args.out.write_text(json.dumps({"meta": meta, "tiers": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
