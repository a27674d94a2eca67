"""Servers for the serve tests: ``noodle serve`` as a subprocess, or the app in a uvicorn thread.

Both listen on 127.0.0.1 on a free port, wait until ``/readyz`` says ready, and are
always stopped (SIGTERM, then SIGKILL if the drain bound passes).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = ["ServeProc", "start_serve", "app_server", "slow_plan", "wait_ready", "CHAT_TEMPLATE"]

_LINE = re.compile(r"on http://127\.0\.0\.1:(\d+)/v1")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def wait_ready(base: str, timeout_s: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"noodle serve exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{base} not ready after {timeout_s} s")


@dataclass
class ServeProc:
    proc: subprocess.Popen[bytes]
    base: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@contextlib.contextmanager
def start_serve(args: Sequence[str], *, ready: bool = True,
                nofile: tuple[int, int] | None = None) -> Iterator[ServeProc]:  # fmt: skip
    """``noodle serve ARGS --port 0`` in a subprocess; yields once it is ready, stops it on exit.

    ``nofile``: the (soft, hard) open-file limit the process starts with.
    """
    fd, log_name = tempfile.mkstemp(prefix="noodle-serve-", suffix=".log")
    os.close(fd)
    log_path = Path(log_name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "noodle.cli.main", "serve", *args, "--host", "127.0.0.1",
                                 "--port", "0", "--threads", "1"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=limit if nofile else None)  # fmt: skip
    sp = ServeProc(proc, "", log_path)
    try:
        deadline = time.monotonic() + 120
        while not sp.base:
            m = _LINE.search(sp.log())
            if m:
                sp.base = f"http://127.0.0.1:{m.group(1)}"
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"noodle serve did not start:\n{sp.log()}")
            else:
                time.sleep(0.1)
        if ready:
            wait_ready(sp.base, proc=proc)
        yield sp
    finally:
        sp.stop()
        log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def app_server(served: Any) -> Iterator[str]:
    """Run a :class:`noodle.serve.app.ServeApp` with uvicorn in a thread; yields its base URL."""
    import uvicorn

    from noodle.cli.serve import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    config = uvicorn.Config(served.app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    served.on_drained = lambda: setattr(server, "should_exit", True)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_ready(base)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def slow_plan(doc: Any, step_ms: float) -> Any:
    """The same plan with every stage's decode step planned at ``step_ms`` (for ``--emulate``)."""
    stages = [s.model_copy(update={"compute_ms": step_ms, "expected_latency_ms": step_ms + s.hop_ms}) for s in doc.stages]
    return doc.model_copy(update={"stages": stages})
