"""Profiler hook overhead on GPT-2 small: specialized and generic hooks vs no hooks.

Runs interleaved rounds in one process (see bench/profilebench.py), prints a
table and writes bench/results/profile_overhead.{json,csv,png}.

    python bench/profile_overhead.py [--rounds 30] [--preset gpt2]
    noodle bench profile            # the same from the CLI
"""

from __future__ import annotations

import argparse
from pathlib import Path

from noodle.cli.bench_profile import run_profile_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    run_profile_bench(args.preset, args.rounds, args.warmup, args.prompt_tokens, args.decode_tokens, args.out,
                      threads=args.threads)


if __name__ == "__main__":
    main()
