"""One console for stdout, one for stderr, and the log handler: configured here, at the CLI edge.

Rich sizes a console to the terminal; piped into a file or another program it would fall back
to 80 columns and cut tables (``pre… out/… pla…``), so a console that is not a terminal gets
``COLUMNS`` or 200 columns. Library code logs through ``logging.getLogger(__name__)``; the CLI
shows INFO and above on stderr (``-v``: DEBUG, ``-q``: warnings and errors only).

Without ``-v`` the libraries underneath stay quiet too: no weight-loading progress bars, no
transformers advice or deprecation warnings (in worker processes as well, through their environment).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
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
    """A Rich handler that writes to whatever ``sys.stderr`` is when a record arrives (a terminal)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.console = stderr_console()
        super().emit(record)


class _PlainStderrHandler(logging.StreamHandler):
    """Plain lines (no padding to the console's width) to whatever ``sys.stderr`` is: logs, pipes, files."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Route the ``noodle`` loggers to stderr at INFO (``verbose``: DEBUG; ``quiet``: WARNING)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger("noodle")
    for old in list(root.handlers):
        if isinstance(old, (_StderrHandler, _PlainStderrHandler)):
            root.removeHandler(old)
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = _StderrHandler(console=stderr_console(), show_time=False, show_path=verbose > 0, markup=False,
                                 rich_tracebacks=False, show_level=verbose > 0)  # fmt: skip
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = _PlainStderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    if not verbose:
        quiet_libraries()


def quiet_libraries() -> None:
    """Silence third-party progress bars and advice (read by transformers and huggingface_hub at import)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|torch|huggingface_hub)(\.|$)")
