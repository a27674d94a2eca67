"""``noodle bench``: a command group; each benchmark registers its own subcommand."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from noodle.errors import SpecError

__all__ = ["bench_app", "register", "use_bench"]

REPO = Path(__file__).resolve().parents[2]


def use_bench() -> None:
    """Make the source checkout's ``bench`` package importable (benchmarks do not ship in the wheel)."""
    if not (REPO / "bench" / "__init__.py").is_file():
        raise SpecError(f"noodle bench: {REPO / 'bench'} not found; benchmarks run from a source checkout of noodle")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))

bench_app = typer.Typer(help="Benchmarks: solvers, executors, profiler overhead.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
