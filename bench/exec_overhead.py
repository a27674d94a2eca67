"""Staged-execution overhead on GPT-2 small: native HF decode loop vs 1-4 stages in one process.

Runs interleaved rounds in one process (see bench/execbench.py), prints a
table and writes bench/results/exec_overhead.{json,csv,png}.

    python bench/exec_overhead.py [--rounds 10] [--preset gpt2] [--threads 1]
    noodle bench exec            # the same from the CLI
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench` as a package

import argparse
from pathlib import Path

from bench.execbench import run_exec_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--max-stages", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    run_exec_bench(args.preset, args.max_stages, args.rounds, args.warmup, args.prompt_tokens, args.decode_tokens,
                   args.threads, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
