"""``noodle bench exec``: decode tokens/s of the unsplit model vs 1-4 stages in one process."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["register", "bench_exec_cmd"]


def bench_exec_cmd(
    preset: str = typer.Option("gpt2", "--preset", help="model preset to measure (random weights)"),
    max_stages: int = typer.Option(4, "--max-stages", help="measure plans of 1..N stages"),
    rounds: int = typer.Option(10, "--rounds", help="interleaved rounds (each runs every mode once)"),
    warmup: int = typer.Option(1, "--warmup", help="warm-up rounds, not counted"),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens"),
    decode_tokens: int = typer.Option(32, "--decode-tokens"),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads (0: torch's default; 1 keeps a shared box quiet)"),
    out: Path = typer.Option(Path("bench/results"), "--out", "-o", help="results folder"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Staged-execution overhead: native HF decode loop vs the local executor (interleaved, one process)."""
    from noodle.extras import require_exec

    require_exec("noodle bench exec")
    from noodle.cli.bench import use_bench

    use_bench()
    from bench.execbench import run_exec_bench

    run_exec_bench(preset, max_stages, rounds, warmup, prompt_tokens, decode_tokens, threads, out, seed)


def register(app: typer.Typer) -> None:
    from noodle.cli.bench import bench_app

    bench_app.command("exec")(bench_exec_cmd)
