"""Entry point of the ``noodle`` command.

Each command lives in its own module exposing ``register(app)``. A
:class:`~noodle.errors.NoodleError` becomes one line on stderr and its exit code;
bad flags exit 2 through click; Ctrl-C exits 130. No traceback for user errors.
"""

from __future__ import annotations

import importlib
import sys

import click
import typer

from noodle.errors import NoodleError

__all__ = ["app", "main"]

COMMAND_MODULES = (
    "noodle.cli.solve",
    "noodle.cli.plot",
    "noodle.cli.bench",
    "noodle.cli.exec",
    "noodle.cli.bench_exec",
    "noodle.cli.model",
    "noodle.cli.profile",
    "noodle.cli.bench_profile",
    "noodle.cli.worker",
    "noodle.cli.bench_distributed",
    "noodle.cli.bench_solvers",
    "noodle.cli.bench_pipeline",
)

app = typer.Typer(
    name="noodle",
    help="Run one large language model across several unequal machines: profile, plan, execute.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (``sys.exit`` is left to the caller)."""
    try:
        app(args=argv, prog_name="noodle", standalone_mode=False)
    except NoodleError as exc:
        print(f"noodle: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("noodle: interrupted", file=sys.stderr)
        return 130
    return 0


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
