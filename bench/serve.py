"""Serving benchmark: streaming clients at 1..32 concurrency against ``noodle serve --emulate``.

Starts ``noodle serve`` on an emulated three-node plan (see bench/servebench.py), prints
a table and writes bench/results/serve.{json,csv,png}.

    python bench/serve.py [--levels 1,2,4,8,16,32] [--duration 8] [--max-tokens 32]
    noodle bench serve            # the same from the CLI
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench` as a package

import argparse
from pathlib import Path

from bench.servebench import run_serve_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-tiny")
    parser.add_argument("--levels", default="1,2,4,8,16,32")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    run_serve_bench(args.preset, levels, args.duration, args.max_tokens, args.threads, args.out)


if __name__ == "__main__":
    main()
