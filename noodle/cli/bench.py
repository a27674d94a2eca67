"""``noodle bench``: a command group; each benchmark registers its own subcommand."""

from __future__ import annotations

import typer

__all__ = ["bench_app", "register"]

bench_app = typer.Typer(help="Benchmarks: solvers, executors, profiler overhead.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
