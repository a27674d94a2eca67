"""Solver comparison: auto, cpsat, milp, heuristic and the baselines on seeded heterogeneous instances.

Real architectures (GPT-2 small/XL, Llama-2 7B/13B/70B, a GPT-3-shaped 96-block GPT-2)
on clusters of 3 to 32 nodes (64 with --size large): prints a table and writes
solvers.{json,csv} and solvers_{time,quality}.png into out/bench/solvers (--out to choose;
--commit-results refreshes the committed bench/results).

    python bench/solvers.py [--size default] [--seeds 2] [--time-limit 5]
    noodle bench solvers            # the same from the CLI
"""

from __future__ import annotations

import argparse
from pathlib import Path

from noodle.cli.bench_solvers import RESULTS, SCRATCH, results_folder, run_solver_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="default", choices=["small", "default", "large"])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=5.0)
    parser.add_argument("--solvers", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder [{SCRATCH}]")
    parser.add_argument("--commit-results", action="store_true", help=f"write into the committed {RESULTS}")
    args = parser.parse_args()
    run_solver_bench(args.size, args.seeds, args.time_limit, args.solvers, results_folder(args.out, args.commit_results))


if __name__ == "__main__":
    main()
