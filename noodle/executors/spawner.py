"""Local worker processes forked from a preloaded fork server.

Importing torch and transformers costs a worker process several CPU-seconds.
When one coordinator starts its own workers (``--backend torchrpc`` on one
machine, tests, benchmarks), they are forked from a ``multiprocessing`` fork
server that imported those modules once: N workers, and any respawn after a
failure, pay the import once per coordinator process instead of N times. The
fork server is a fresh interpreter (not a fork of the coordinator, whose gRPC
and OpenMP threads would not survive a fork) and exits with the coordinator.

As with ``multiprocessing``'s spawn and forkserver methods, each worker imports
the coordinator's main module (as ``__mp_main__``): a script that starts workers
must keep its top-level code under ``if __name__ == "__main__":``.

A :class:`WorkerProcess` looks like a ``subprocess.Popen`` to its users
(``pid``, ``poll``, ``wait``, ``kill``, ``send_signal``, ``returncode``); its stdout and
stderr go to a log file that :meth:`WorkerProcess.log_text` reads.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["WorkerProcess", "spawn", "stop_spawner", "PRELOAD"]

PRELOAD = [
    "torch",
    "torch.distributed",
    "transformers",
    "transformers.masking_utils",
    "transformers.cache_utils",
    "transformers.models.auto.modeling_auto",
    "safetensors.torch",
    "noodle.executors.slicing",
    "noodle.executors.devices",
    "noodle.executors.ring.worker",
    "noodle.executors.grpc.server",
]
_lock = threading.Lock()
_ctx: Any = None


def _context(extra: Sequence[str] = ()) -> Any:
    global _ctx
    with _lock:
        if _ctx is None:
            _ctx = multiprocessing.get_context("forkserver")
            _ctx.set_forkserver_preload([*PRELOAD, *extra])
        return _ctx


def _child(log_path: str, fn: Callable[..., int | None], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    code = fn(*args, **kwargs)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


class WorkerProcess:
    """A forked worker with a ``Popen``-like interface and its own log file."""

    def __init__(self, fn: Callable[..., int | None], *args: Any, preload: Sequence[str] = (), **kwargs: Any) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix="noodle-worker-", suffix=".log")
        os.close(fd)
        self._proc = _context(preload).Process(target=_child, args=(self.log_path, fn, args, kwargs), daemon=False)
        self._proc.start()
        self.pid: int = int(self._proc.pid or 0)
        self._closed_code: int | None = None
        self._closed = False

    @property
    def returncode(self) -> int | None:
        return self._closed_code if self._closed else self._proc.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        if self._closed:
            return self._closed_code
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            import subprocess

            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
        return self._proc.exitcode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and not self._closed:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        if self.returncode is None and not self._closed:
            self._proc.kill()

    def log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Kill (if alive), reap, and delete the log."""
        if self._closed:
            return
        if self._proc.exitcode is None:
            self.send_signal(signal.SIGCONT)
            self.kill()
            self._proc.join(30)
        self._closed_code = self._proc.exitcode
        self._closed = True
        self._proc.close()
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


def spawn(fn: Callable[..., int | None], *args: Any, preload: Sequence[str] = (), **kwargs: Any) -> WorkerProcess:
    """Run ``fn(*args, **kwargs)`` in a process forked from the fork server; its return is the exit code."""
    return WorkerProcess(fn, *args, preload=preload, **kwargs)


def stop_spawner() -> None:
    """Stop the fork server and multiprocessing's resource tracker now (both also exit with this process)."""
    global _ctx
    with _lock:
        if _ctx is None:
            return
        from multiprocessing import forkserver, resource_tracker

        forkserver._forkserver._stop()  # type: ignore[attr-defined]
        resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined] # started with the fork server
        _ctx = None
