"""Connections (issue 24, item 3): idle and slow-header sockets cannot lock clients out of ``noodle serve``.

A real ``noodle serve`` started with a 1,024 open-file soft limit (a common default) gets 1,100
idle connections, then a request through the official ``openai`` client must still succeed:
the server raises its soft limit to the hard one, and where the hard limit is 1,024 too it holds
fewer connections and closes the longest idle ones first.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from .conftest import API_KEY
from .edge import connect
from .servers import start_serve

MODEL = "gpt2-tiny"
IDLE = 1100


def _room_for_sockets(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 200:
        if hard != resource.RLIM_INFINITY and hard < n + 200:
            pytest.skip(f"this test process may open {hard} files (hard RLIMIT_NOFILE); {n} sockets need ~{n + 200}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 200, hard))


def _closed(sock: socket.socket) -> bool:
    """Did the server close it? (No select(): these descriptors run past 1,024.)"""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.mark.parametrize("hard", ["raised", 1024], ids=["soft-1024-raised-to-hard", "hard-1024"])
def test_1100_idle_connections_do_not_lock_out_a_client(model_dir: Path, plan_file: Path, hard: object) -> None:
    _room_for_sockets(IDLE)
    own_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limits = (1024, own_hard) if hard == "raised" else (1024, 1024)
    if hard == "raised" and own_hard != resource.RLIM_INFINITY and own_hard < IDLE + 300:
        pytest.skip(f"the hard open-file limit here is {own_hard}: raising the soft limit cannot make room")
    args = ["--model", str(model_dir), "--plan", str(plan_file), "--api-key", API_KEY, "--header-timeout", "300"]
    with start_serve(args, nofile=limits) as sp, contextlib.ExitStack() as stack:
        soft_now = psutil.Process(sp.proc.pid).rlimit(psutil.RLIMIT_NOFILE)[0]
        idle = [stack.enter_context(connect(sp.base)) for _ in range(IDLE)]
        time.sleep(0.5)  # let the server accept them all
        client = openai.OpenAI(base_url=f"{sp.base}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        out = client.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0)
        assert out.choices[0].text is not None and out.usage.completion_tokens == 4
        assert httpx.get(f"{sp.base}/healthz", timeout=30).status_code == 200
        closed = sum(_closed(s) for s in idle)
        print(f"server soft RLIMIT_NOFILE {soft_now}; {closed} of {IDLE} idle connections closed by the server")
        if hard == "raised":
            assert soft_now == limits[1] or soft_now >= IDLE + 300
            assert closed == 0  # room for all of them
        else:
            assert soft_now == 1024
            port = int(sp.base.rsplit(":", 1)[1])
            held = [c for c in psutil.Process(sp.proc.pid).net_connections("tcp")
                    if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED]  # fmt: skip
            assert closed > 0 and len(held) <= 1024 - 256 + 1, (closed, len(held))  # the longest idle ones went
        log = sp.log()
        assert "Traceback" not in log, log[-3000:]
        assert log.count("Too many open files") <= 2, log[-3000:]  # one line per 10 s at most


def test_slow_headers_are_cut_at_the_header_timeout(model_dir: Path, plan_file: Path) -> None:
    args = ["--model", str(model_dir), "--plan", str(plan_file), "--header-timeout", "1.5"]
    with start_serve(args) as sp:
        silent = connect(sp.base)
        with connect(sp.base) as slow, silent:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            trickled = 0
            for _ in range(40):  # one header line every 0.25 s: 10 s if never cut
                if _closed(slow):
                    break
                slow.sendall(b"X-Slow: %d\r\n" % trickled)
                trickled += 1
                time.sleep(0.25)
            assert _closed(slow), "a client trickling its headers was never closed"
            assert trickled < 40
            assert _closed(silent)  # a connection that never said anything is closed too
        assert httpx.get(f"{sp.base}/healthz", timeout=10).status_code == 200
