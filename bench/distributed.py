"""Distributed executors on loopback: local vs torchrpc vs gRPC, GPT-2 small in 3 stages.

Interleaved rounds in one coordinator process with 3 worker processes per backend
(see bench/distbench.py); prints a table and writes
bench/results/distributed.{json,csv,png}. Also measures the floor: a plain TCP
ping-pong of one decode step's activation (768 x float32 = 3 KiB).

    python bench/distributed.py [--rounds 5] [--preset gpt2] [--stages 3]
    noodle bench distributed      # the same from the CLI
"""

from __future__ import annotations

import argparse
from pathlib import Path

from noodle.cli.bench_distributed import run_distributed_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--modes", default="local,torchrpc,grpc,grpc-unary")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    run_distributed_bench(args.preset, args.stages, args.rounds, args.warmup, args.prompt_tokens, args.decode_tokens,
                          args.threads, args.modes, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
