"""``noodle bench serve``: streaming clients at 1..32 concurrency against an emulated ``noodle serve``."""

from __future__ import annotations

from pathlib import Path

import typer

from noodle.errors import SpecError

__all__ = ["register", "bench_serve_cmd"]


def bench_serve_cmd(
    preset: str = typer.Option("gpt2-tiny", "--preset", help="model preset to serve (random weights)"),
    levels: str = typer.Option("1,2,4,8,16,32", "--levels", help="concurrent clients per level, comma-separated"),
    duration: float = typer.Option(8.0, "--duration", help="seconds per level"),
    max_tokens: int = typer.Option(32, "--max-tokens", help="new tokens per request"),
    threads: int = typer.Option(1, "--threads", help="the server's torch CPU threads"),
    out: Path = typer.Option(Path("bench/results"), "--out", "-o", help="results folder"),
) -> None:
    """Serving benchmark: requests/s, output tokens/s, TTFT and inter-token latency p50/p95/p99."""
    from noodle.cli.bench import use_bench

    use_bench()
    from bench.servebench import run_serve_bench

    try:
        counts = [int(x) for x in levels.split(",") if x.strip()]
    except ValueError:
        raise SpecError(f"--levels: expected comma-separated integers like 1,2,4, got {levels!r}") from None
    if not counts or min(counts) < 1:
        raise SpecError(f"--levels: every level must be >= 1, got {levels!r}")
    if duration <= 0 or max_tokens < 1:
        raise SpecError(f"--duration must be > 0 and --max-tokens >= 1, got {duration:g} and {max_tokens}")
    run_serve_bench(preset, counts, duration, max_tokens, threads, out)


def register(app: typer.Typer) -> None:
    from noodle.cli.bench import bench_app

    bench_app.command("serve")(bench_serve_cmd)
