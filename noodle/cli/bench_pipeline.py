"""``noodle bench pipeline``: runs ``bench/pipeline.py`` of a source checkout (pipelined tokens/s vs the plan)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import typer

from noodle.errors import SpecError

__all__ = ["register", "bench_pipeline_cmd"]

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "pipeline.py"


def bench_pipeline_cmd(
    threads: int = typer.Option(1, "--threads", help="torch CPU threads per process"),
    levels: str = typer.Option("1,2,3,4,8,16", "--levels", help="sequences in flight to measure"),
    no_grpc: bool = typer.Option(False, "--no-grpc", help="emulated plans only (no loopback workers)"),
    out: Path = typer.Option(Path("bench/results"), "--out", "-o", help="results folder"),
) -> None:
    """Pipelined execution: tokens/s at 1..16 sequences in flight against the plan's bound, TTFT with chunked prefill."""
    if not SCRIPT.is_file():
        raise SpecError(f"bench pipeline: {SCRIPT} not found; benchmarks run from a source checkout of noodle")
    try:
        parsed = [int(x) for x in levels.split(",") if x.strip()]
    except ValueError:
        raise SpecError(f"--levels: expected comma-separated integers like 1,2,4, got {levels!r}") from None
    if not parsed or min(parsed) < 1:
        raise SpecError(f"--levels: every level must be >= 1, got {levels!r}")
    argv = ["--threads", str(threads), "--levels", ",".join(map(str, parsed)), "--out", str(out)]
    sys.argv = [str(SCRIPT), *argv, *(["--no-grpc"] if no_grpc else [])]
    runpy.run_path(str(SCRIPT), run_name="__main__")


def register(app: typer.Typer) -> None:
    from noodle.cli.bench import bench_app

    bench_app.command("pipeline")(bench_pipeline_cmd)
