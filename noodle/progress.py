"""Progress on stderr for long work: a rich bar on a terminal, else a log line every few seconds."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["progress_bar"]

_log = logging.getLogger("noodle.progress")


@contextmanager
def progress_bar(enabled: bool, label: str, total: int, every_s: float = 5.0) -> Iterator[Callable[[], None]]:
    """Yield a function that advances the progress of ``label`` by one of ``total`` steps.

    On a terminal a rich bar; otherwise (logs, pipes) an INFO line every ``every_s`` seconds with the
    steps done and an estimate of the time left; nothing when ``enabled`` is false.
    """
    if not enabled:
        yield lambda: None
        return
    if not sys.stderr.isatty():
        t0 = last = time.monotonic()
        done = 0

        def advance() -> None:
            nonlocal done, last
            done += 1
            now = time.monotonic()
            if now - last >= every_s and done < total:
                last = now
                left = (now - t0) / done * (total - done)
                _log.info("%s: %d/%d, about %.0f s left", label, done, total, left)

        yield advance
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)
