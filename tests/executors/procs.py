"""Worker processes for the distributed-executor tests: started in parallel, always stopped.

``WorkerPool`` starts ``noodle worker`` processes (``--port 0``; the first stdout
line names the port) and kills every one of them on ``close``. ``no_children``
lists this process's live child processes, so tests can check none is left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil
import pytest

__all__ = ["WorkerProc", "WorkerPool", "children", "spawner", "SharedExecutor"]

_LINE = re.compile(r"serving grpc on (\S+):(\d+)")


@dataclass
class WorkerProc:
    proc: Any  # subprocess.Popen or noodle.executors.spawner.WorkerProcess
    log: IO[bytes] | None
    address: str = ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process must run to die cleanly
            self.proc.kill()
        self.proc.wait(timeout=30)

    def log_text(self) -> str:
        if self.log is None:
            return self.proc.log_text()  # type: ignore[attr-defined]
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


class WorkerPool:
    """gRPC workers of one model folder on 127.0.0.1, started together.

    ``cli`` of them run ``noodle worker`` as a subprocess (the command line and
    ``NOODLE_TOKEN`` for real); the rest are forked from the executors' fork
    server (:mod:`noodle.executors.spawner`), which saves each one the import of
    torch and transformers.
    """

    def __init__(self, model_dir: Path, n: int, *, cli: int = 1, token: str | None = None,
                 timeout_s: float = 180.0) -> None:  # fmt: skip
        from noodle.executors.grpc.worker import WorkerConfig
        from noodle.executors.spawner import spawn

        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("NOODLE_TOKEN", None)
        if token:
            env["NOODLE_TOKEN"] = token
        cmd = [sys.executable, "-m", "noodle.cli.main", "worker", "--model", str(model_dir), "--port", "0",
               "--threads", "1"]  # fmt: skip
        self.workers: list[WorkerProc] = []
        try:
            for i in range(n):
                if i < cli:
                    out = tempfile.TemporaryFile()
                    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
                    self.workers.append(WorkerProc(proc, out))
                else:
                    config = WorkerConfig(model_dir=model_dir, port=0, token=token)
                    self.workers.append(WorkerProc(spawn(_serve_one_thread, config), None))  # type: ignore[arg-type]
            deadline = time.monotonic() + timeout_s
            for w in self.workers:
                while not w.address:
                    m = _LINE.search(w.log_text())
                    if m:
                        w.address = f"{m.group(1)}:{m.group(2)}"
                    elif not w.alive or time.monotonic() > deadline:
                        raise RuntimeError(f"worker did not start:\n{w.log_text()[-3000:]}")
                    else:
                        time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    def live(self) -> list[WorkerProc]:
        return [w for w in self.workers if w.alive]

    def close(self) -> None:
        for w in self.workers:
            w.kill()
            if w.log is not None:
                w.log.close()
            else:
                w.proc.close()  # type: ignore[attr-defined]


def _serve_one_thread(config: object) -> int:
    import torch

    from noodle.executors.grpc.server import run_forever

    torch.set_num_threads(1)
    return run_forever(config)  # type: ignore[arg-type]


def _helper_pids() -> set[int | None]:
    from multiprocessing import forkserver, resource_tracker

    return {getattr(forkserver._forkserver, "_forkserver_pid", None), getattr(resource_tracker._resource_tracker, "_pid", None)}


def children() -> list[psutil.Process]:
    """Live child processes of this test process, but the shared fork server and its resource tracker."""
    out = []
    helpers = _helper_pids()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.pid not in helpers and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="session")
def spawner() -> Iterator[None]:
    """The fork server the executors' workers come from, stopped (and checked gone) at the end."""
    yield
    from noodle.executors.spawner import stop_spawner

    stop_spawner()
    left = [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"


class SharedExecutor:
    """Hands ``check_executor`` an executor that is already running (and leaves it running)."""

    def __init__(self, executor: object, cuts: Sequence[int]) -> None:
        self.executor = executor
        self.cuts = list(cuts)

    def __call__(self, plan: object, model_dir: object) -> SharedExecutor:
        got = [s.start for s in plan.stages] + [plan.stages[-1].end]  # type: ignore[attr-defined]
        assert got == self.cuts, f"shared executor runs cuts {self.cuts}, asked for {got}"
        return self

    def __enter__(self) -> object:
        return self.executor

    def __exit__(self, *exc: object) -> None:
        return None
