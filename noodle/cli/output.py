"""One console for stdout, one for stderr, and the log handler: configured here, at the CLI edge.

Rich sizes a console to the terminal; piped into a file or another program it would fall back
to 80 columns and cut tables (``pre… out/… pla…``), so a console that is not a terminal gets
``COLUMNS`` or 200 columns. Library code logs through ``logging.getLogger(__name__)``; the CLI
shows INFO and above on stderr (``-v``: DEBUG, ``-q``: warnings and errors only).
"""

from __future__ import annotations

import logging
import os
import sys
from functools import lru_cache

from rich.console import Console
from rich.logging import RichHandler

__all__ = ["stdout_console", "stderr_console", "setup_logging", "PIPED_WIDTH"]

PIPED_WIDTH = 200


def _width(stream: object) -> int | None:
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return None  # Rich measures the terminal
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else PIPED_WIDTH


@lru_cache(maxsize=None)
def _console(stderr: bool, width: int | None) -> Console:
    return Console(stderr=stderr, width=width)


def stdout_console() -> Console:
    """The console for results (stdout)."""
    return _console(False, _width(sys.stdout))


def stderr_console() -> Console:
    """The console for progress, notes and errors (stderr)."""
    return _console(True, _width(sys.stderr))


class _StderrHandler(RichHandler):
    """A Rich handler that writes to whatever ``sys.stderr`` is when a record arrives."""

    def emit(self, record: logging.LogRecord) -> None:
        self.console = stderr_console()
        super().emit(record)


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Route the ``noodle`` loggers to stderr at INFO (``verbose``: DEBUG; ``quiet``: WARNING)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger("noodle")
    for handler in list(root.handlers):
        if isinstance(handler, _StderrHandler):
            root.removeHandler(handler)
    handler = _StderrHandler(console=stderr_console(), show_time=False, show_path=verbose > 0, markup=False,
                             rich_tracebacks=False, show_level=verbose > 0)  # fmt: skip
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
