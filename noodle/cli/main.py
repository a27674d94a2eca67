"""Entry point of the ``noodle`` command (also ``python -m noodle``).

Each command lives in its own module exposing ``register(app)``. Exit codes:
0 success; 2 bad input (usage errors from the argument parser, and every
:class:`~noodle.errors.SpecError`/``ModelError``); 3 infeasible; 4 solver
unavailable; 5 execution failed; 130 interrupted (Ctrl-C). A
:class:`~noodle.errors.NoodleError` becomes one line on stderr, never a traceback.

The parser's exceptions are recognised by shape (an int ``exit_code`` and a
``show()`` method), not by class: typer bundles its own copy of click in some
versions and uses the real ``click`` in others.
"""

from __future__ import annotations

import importlib
import sys

import typer

from noodle import __version__
from noodle.cli.output import setup_logging
from noodle.errors import NoodleError

__all__ = ["app", "main", "package_version", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

COMMAND_MODULES = (
    "noodle.cli.solve",
    "noodle.cli.plot",
    "noodle.cli.bench",
    "noodle.cli.exec",
    "noodle.cli.bench_exec",
    "noodle.cli.model",
    "noodle.cli.cluster",
    "noodle.cli.deploy",
    "noodle.cli.profile",
    "noodle.cli.bench_profile",
    "noodle.cli.worker",
    "noodle.cli.bench_distributed",
    "noodle.cli.bench_solvers",
    "noodle.cli.bench_pipeline",
    "noodle.cli.serve",
    "noodle.cli.bench_serve",
)

app = typer.Typer(
    name="noodle",
    help="Run one large language model across several unequal machines: profile, plan, execute.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def package_version() -> str:
    """The installed distribution's version (package metadata), or ``unknown`` when not installed."""
    return __version__


def _print_version(value: bool) -> None:
    if value:
        print(f"noodle {package_version()}")
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
    ),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More detail on stderr (debug logs)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
) -> None:
    """Run one large language model across several unequal machines: profile, plan, execute."""
    setup_logging(verbose, quiet)


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def _interrupted() -> int:
    print("noodle: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def _parser_exit(exc: BaseException) -> int | None:
    """The exit code for an exception of the argument parser (any click copy), or None if it is not one."""
    code = getattr(exc, "exit_code", None)
    if not isinstance(code, int) or isinstance(exc, NoodleError):
        names = {k.__name__ for k in type(exc).__mro__}
        return EXIT_INTERRUPTED if "Abort" in names else None
    show = getattr(exc, "show", None)
    if callable(show):  # ClickException and its usage errors
        show()
        return code if code >= EXIT_USAGE else EXIT_USAGE
    return code  # Exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (``sys.exit`` is left to the caller)."""
    try:
        rv = app(args=argv, prog_name="noodle", standalone_mode=False)
    except NoodleError as exc:
        print(f"noodle: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as exc:  # noqa: BLE001 - only the parser's own exceptions are handled, the rest re-raised
        code = _parser_exit(exc)
        if code is None:
            raise
        return _interrupted() if code == EXIT_INTERRUPTED else code
    # Without standalone mode a raised Exit(code) comes back as the return value; typer turns Ctrl-C into Exit(130).
    code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    return _interrupted() if code == EXIT_INTERRUPTED else code


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
