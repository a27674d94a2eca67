"""Shutdown in every state of ``noodle serve --cluster`` (issue 24, item 4), with real serve and worker processes.

The first SIGTERM ends the coordinator within its drain timeout while it loads the stages (a worker
that hangs: its connections are held by a proxy that forwards only the join's timed probe), while it
re-plans (onto such a worker), and while it drains a request that would run past the drain timeout.
A request in flight when the last worker dies ends with a clear error at once, not after
``--request-timeout``.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from .servers import ServeProc, start_serve, wait_ready
from .test_cluster import _processes, _wait, _worker
from .test_shutdown import DRAIN_S, MODEL, _cluster_args, _ends_on_first


class HangingProxy:
    """Forwards the first ``forward`` TCP connections to ``target``; later ones are accepted and never answered."""

    def __init__(self, target: int, forward: int = 1) -> None:
        self.target = target
        self.left = forward
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.left <= 0:
                self.held.append(conn)  # a worker that hangs: the connection opens, nothing ever comes back
                continue
            self.left -= 1
            up = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _hanging_worker(model_dir: Path, base: str, name: str, cache: Path, log: Path,
                    procs: list[Any]) -> Iterator[HangingProxy]:  # fmt: skip
    """A real worker that joins through a proxy: its timed probe passes, every later connection hangs."""
    port = _free_port()
    proxy = HangingProxy(port)
    procs.append(_worker(model_dir, base, name, cache, log, extra=("--port", str(port), "--advertise",
                                                                   f"127.0.0.1:{proxy.port}")))  # fmt: skip
    try:
        yield proxy
    finally:
        proxy.close()


def _args(model_dir: Path, min_workers: int) -> list[str]:
    return [*_cluster_args(model_dir, min_workers), "--probe-interval", "0"]


def test_sigterm_while_loading_the_stages(model_dir: Path, tmp_path: Path) -> None:
    with start_serve(_args(model_dir, 1), ready=False) as sp, _processes() as procs:
        with _hanging_worker(model_dir, sp.base, "w1", tmp_path / "cache", tmp_path / "w1.log", procs):
            _wait(lambda: "node w1 claims" in sp.log(), 240, "w1's timed probe")
            _wait(lambda: "first plan failed" in sp.log(), 60, "the first plan to hang on w1")
            assert httpx.get(f"{sp.base}/noodle/status", timeout=10).json()["state"] == "loading"
            _ends_on_first(sp, signal.SIGTERM)


def _slow_worker(model_dir: Path, base: str, name: str, cache: Path, log: Path) -> Any:
    """A worker whose every step takes 100x its compute (from its first step on, as its table says)."""
    return _worker(model_dir, base, name, cache, log, extra=("--emulate-slowdown", "100", "--slowdown-after-s", "0"))


def _long_request(base: str) -> Future[httpx.Response]:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 240, "temperature": 0}
    pool = ThreadPoolExecutor(1)
    fut = pool.submit(lambda: httpx.post(f"{base}/v1/completions", json=body, timeout=180))
    pool.shutdown(wait=False)
    return fut


def _generating(sp: ServeProc) -> bool:
    pipe = httpx.get(f"{sp.base}/noodle/status", timeout=10).json()["pipeline"] or {}
    return bool(pipe.get("tokens_generated"))


def test_sigterm_while_re_planning(model_dir: Path, tmp_path: Path) -> None:
    with start_serve(_args(model_dir, 1), ready=False) as sp, _processes() as procs:
        w1 = _worker(model_dir, sp.base, "w1", tmp_path / "cache", tmp_path / "w1.log")
        procs.append(w1)
        wait_ready(sp.base, timeout_s=240, proc=sp.proc)
        with _hanging_worker(model_dir, sp.base, "w2", tmp_path / "cache", tmp_path / "w2.log", procs):
            _wait(lambda: "node w2 claims" in sp.log(), 240, "w2's timed probe")
            w1.kill()  # the plan must move onto w2, which hangs: the re-plan retries
            _wait(lambda: "re-plan failed" in sp.log(), 60, "a re-plan to hang on w2")
            held = _long_request(sp.base)
            _wait(lambda: httpx.get(f"{sp.base}/noodle/status", timeout=10).json()["in_flight_requests"], 30,
                  "the request to be held")  # fmt: skip
            _ends_on_first(sp, signal.SIGTERM)
            resp = held.result(timeout=30)  # the held request was ended, not left to its 600 s timeout
            assert resp.status_code >= 500 and "Traceback" not in resp.text, resp.text


def test_sigterm_while_draining_a_long_request(model_dir: Path, tmp_path: Path) -> None:
    with start_serve(_args(model_dir, 1), ready=False) as sp, _processes() as procs:
        procs.append(_slow_worker(model_dir, sp.base, "w1", tmp_path / "cache", tmp_path / "w1.log"))
        wait_ready(sp.base, timeout_s=240, proc=sp.proc)
        running = _long_request(sp.base)
        _wait(lambda: _generating(sp), 60, "the long request to generate")
        t0 = time.monotonic()
        _ends_on_first(sp, signal.SIGTERM)
        print(f"\nended {time.monotonic() - t0:.1f} s after SIGTERM (drain timeout {DRAIN_S} s)")
        assert "drain: cancelling 1 request(s) still running after 5 s" in sp.log(), sp.log()[-3000:]
        resp = running.result(timeout=30)
        assert resp.status_code == 500 and "cancelled" in resp.json()["error"]["message"], resp.text


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_the_last_worker_dying_ends_requests_in_flight_with_a_clear_error(model_dir: Path, tmp_path: Path,
                                                                          stream: bool) -> None:  # fmt: skip
    with start_serve(_args(model_dir, 1), ready=False) as sp, _processes() as procs:
        w1 = _slow_worker(model_dir, sp.base, "w1", tmp_path / "cache", tmp_path / "w1.log")
        procs.append(w1)
        wait_ready(sp.base, timeout_s=240, proc=sp.proc)
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 240, "temperature": 0, "stream": stream}
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(lambda: httpx.post(f"{sp.base}/v1/completions", json=body, timeout=120))
            _wait(lambda: _generating(sp), 60, "the request to generate")
            t0 = time.monotonic()
            w1.kill()
            resp = fut.result()
        took = time.monotonic() - t0
        print(f"\nended {took:.1f} s after the last worker was killed (--request-timeout 600 s)")
        assert "no live worker is left to finish this request" in resp.text, resp.text
        if not stream:
            assert resp.status_code == 500 and resp.json()["error"]["code"] == "engine_error"
        r = httpx.post(f"{sp.base}/v1/completions", json={**body, "stream": False}, timeout=60)
        assert r.status_code == 503 and "no live worker" in r.text  # and new ones are refused at once
