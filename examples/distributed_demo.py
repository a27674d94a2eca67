"""Run one plan on worker processes over gRPC and torch.distributed, kill a worker, and keep going.

    python examples/distributed_demo.py                   # Llama tiny, 3 stages, about a minute
    python examples/distributed_demo.py --preset gpt2     # GPT-2 small (slower to build and load)

Steps: build a model folder (seeded random weights, no hub), cut it into three
stages, start three ``noodle worker`` processes and one spare with a shared token,
generate with ``--backend grpc`` while a worker is killed mid-generation (its stage
moves to the spare, the tokens so far are replayed, and the output is the same as
``local``'s), print the network report, then run the same plan with
``--backend torchrpc`` (spawned workers on this machine).

On several machines the commands are the same with real addresses; see
docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from noodle.cli.exec import render_report
from noodle.cli.network import render_network
from noodle.executors.failover import RetryPolicy
from noodle.executors.grpc.coordinator import GrpcExecutor
from noodle.executors.local import LocalExecutor
from noodle.executors.ring.coordinator import TorchRpcExecutor
from noodle.executors.slicing import unit_names_of
from noodle.models import init_model
from noodle.plandoc import NodeDoc, PlanDoc, Predicted, SolverInfo, StageDoc, even_cuts

NODES = ("desktop-gpu", "laptop", "nas")


def make_plan(model: Path, prompt_tokens: int, new_tokens: int) -> PlanDoc:
    """Three even stages, one per node (what `noodle solve` would write, minus the costs)."""
    units = unit_names_of(model)
    cuts = even_cuts(len(units), len(NODES))
    stages = [
        StageDoc(stage_id=i, node=node, device="cpu", layers=units[a:b], start=a, end=b, compute_ms=1.0, hop_ms=0.5,
                 expected_latency_ms=1.5, memory_required_mb=100.0, memory_available_mb=4096.0, rationale="demo")
        for i, (node, a, b) in enumerate(zip(NODES, cuts, cuts[1:]))
    ]  # fmt: skip
    return PlanDoc(
        name="demo", objective="latency", objective_ms=4.5, cost_model="none",
        solver=SolverInfo(name="even", status="baseline", solve_time_s=0.0),
        predicted=Predicted(token_latency_ms=4.5, bottleneck_ms=1.5, tokens_per_s=222.0), stages=stages,
        units=units, workload={"prompt_tokens": prompt_tokens, "max_new_tokens": new_tokens, "batch_size": 1},
        nodes=[NodeDoc(id=n, device="cpu", memory_gb=4.0, compute_score=1.0) for n in NODES],
    )  # fmt: skip


def start_workers(model: Path, n: int, token: str) -> list[tuple[subprocess.Popen[bytes], str]]:
    """``n`` workers on free ports of 127.0.0.1; each prints where it listens on its first line."""
    env = dict(os.environ, NOODLE_TOKEN=token)  # the token travels by environment, not argv (ps shows argv)
    cmd = [sys.executable, "-m", "noodle.cli.main", "worker", "--model", str(model), "--port", "0", "--threads", "1"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE) for _ in range(n)]
    out = []
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline().decode()
        m = re.search(r"serving grpc on (\S+:\d+)", line)
        if not m:
            raise RuntimeError(f"worker did not start: {line!r}")
        out.append((p, m.group(1)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-tiny")
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--kill-at", type=int, default=4, help="kill the middle worker after this step")
    args = parser.parse_args()
    console = Console()
    prompt = [[5, 17, 99, 42, 7, 300, 12, 8]]
    with tempfile.TemporaryDirectory(prefix="noodle-demo-") as tmp:
        model = init_model(args.preset, Path(tmp) / args.preset, seed=0)
        plan = make_plan(model, len(prompt[0]), args.new_tokens)
        with LocalExecutor(plan, model) as ex:
            want = ex.generate(prompt, max_new_tokens=args.new_tokens).tokens
        console.print(f"local tokens: {want[0]}")

        token = secrets.token_hex(16)
        workers = start_workers(model, len(NODES) + 1, token)
        try:
            addresses = {node: addr for node, (_, addr) in zip(NODES, workers)}
            spare_proc, spare = workers[-1]
            victim = workers[1][0]
            console.print(f"workers: {addresses}; spare: {spare}")

            def kill_middle(step: int) -> None:
                if step == args.kill_at:
                    console.print(f"[bold red]step {step}: killing {NODES[1]} (pid {victim.pid})[/]")
                    victim.kill()

            policy = RetryPolicy(step_timeout_s=10.0, health_timeout_s=1.0, attempts=2, backoff_s=0.1)
            with GrpcExecutor(plan, model, workers=addresses, spares=[spare], token=token, policy=policy) as ex:
                result = ex.generate(prompt, max_new_tokens=args.new_tokens, on_step=kill_middle)
            console.print(f"grpc tokens:  {result.tokens[0]}  (same as local: {result.tokens == want})")
            render_report(result.report, console)
            render_network(result.report, console)
        finally:
            for p, _ in workers:
                p.kill()
                p.wait()
            del spare_proc

        t0 = time.perf_counter()
        with TorchRpcExecutor(plan, model, threads=1) as ex:
            console.print(f"torchrpc: {len(NODES)} workers spawned and loaded in {time.perf_counter() - t0:.1f} s")
            result = ex.generate(prompt, max_new_tokens=args.new_tokens)
        console.print(f"torchrpc tokens: {result.tokens[0]}  (same as local: {result.tokens == want})")
        render_network(result.report, console)


if __name__ == "__main__":
    main()
