"""Disconnects free the sequence, SIGTERM drains and exits, metrics and the status page show the pipeline."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import psutil

from noodle.plandoc import PlanDoc, dump_plan

from .conftest import API_KEY
from .servers import ServeProc, app_server, slow_plan, start_serve

MODEL = "gpt2-tiny"


def test_client_disconnect_cancels_its_sequence(model_dir: Path, plan_doc: PlanDoc) -> None:
    from transformers import AutoTokenizer

    from noodle.serve.build import build_server

    served = build_server(model_dir, slow_plan(plan_doc, 30.0), AutoTokenizer.from_pretrained(model_dir), emulate=True)
    with app_server(served) as base:
        body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 200, "stream": True}).encode()
        port = int(base.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        received = b""
        while b"data: " not in received:  # streaming has begun
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        deadline = time.monotonic() + 5
        while served.runtime.stats().in_flight != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert served.runtime.stats().in_flight == 1
        sock.close()  # 200 tokens at 30 ms would take 6 s
        t0 = time.monotonic()
        while served.runtime.stats().in_flight and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        freed_after = time.monotonic() - t0
        stats = served.runtime.stats()
        assert stats.in_flight == 0 and served.runtime.in_flight == 0
        assert freed_after < 2.0
        assert stats.tokens_generated < 150  # stopped long before max_tokens


def test_sigterm_drains_then_exits_cleanly(model_dir: Path, plan_doc: PlanDoc, tmp_path: Path) -> None:
    plan = tmp_path / "slow.json"
    plan.write_text(dump_plan(slow_plan(plan_doc, 25.0)))
    with start_serve(["--model", str(model_dir), "--plan", str(plan), "--emulate", "--drain-timeout", "20"]) as sp:
        pid = sp.proc.pid
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 40, "temperature": 0, "stream": True}
        lines: list[str] = []

        def stream() -> None:
            with httpx.stream("POST", f"{sp.base}/v1/completions", json=body, timeout=60) as r:
                lines.extend(line for line in r.iter_lines() if line)

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.4)
        sp.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        r = httpx.post(f"{sp.base}/v1/completions", json={**body, "stream": False}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        t.join(timeout=30)
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"  # finished, not cut
        assert sp.proc.wait(timeout=30) == 0
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert "noodle serve: stopped" in sp.log() and "Traceback" not in sp.log()


def test_metrics_health_and_status_page(server: ServeProc) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "prompt": "metrics please", "max_tokens": 6, "temperature": 0}
    assert httpx.post(f"{server.base}/v1/completions", json=body, headers=auth, timeout=60).status_code == 200
    httpx.post(f"{server.base}/v1/completions", json={**body, "model": "nope"}, headers=auth, timeout=60)
    assert httpx.get(f"{server.base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.base}/readyz").json()["ready"] is True
    text = httpx.get(f"{server.base}/metrics").text
    assert re.search(r'noodle_requests_total\{endpoint="/v1/completions",status="200"\} [1-9]', text)
    assert re.search(r'noodle_requests_total\{endpoint="/v1/completions",status="404"\} [1-9]', text)
    for name in ("noodle_time_to_first_token_seconds_count", "noodle_inter_token_latency_seconds_bucket",
                 "noodle_generated_tokens_total", "noodle_tokens_per_second", "noodle_queue_depth", "noodle_in_flight", "noodle_preemptions_total", 'noodle_kv_tokens{kind="reserved"}',
                 'noodle_stage_busy_fraction{node=', 'noodle_stage_step_ms{kind="planned"', 'kind="measured"',
                 "noodle_stage_hop_ms", "noodle_stage_bytes_out_total"):  # fmt: skip
        assert name in text, name
    generated = float(re.search(r"^noodle_generated_tokens_total (\S+)$", text, re.M).group(1))
    assert generated >= 6
    status = httpx.get(f"{server.base}/noodle/status").json()
    assert status["state"] == "ready" and status["model"] == MODEL
    assert [s["units"] for s in status["stages"]] == ["embed..lm_head"]
    assert status["stages"][0]["step_ms_p50"] > 0 and status["stages"][0]["planned_ms"] > 0
    assert status["pipeline"]["tokens_generated"] >= 6
    page = httpx.get(f"{server.base}/")
    assert page.status_code == 200 and "noodle/status" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: no CDN


def test_a_non_streaming_client_that_leaves_cancels_its_sequence(model_dir: Path, plan_doc: PlanDoc) -> None:
    """As a stream's: the engine stops generating for a non-streaming request whose client went away."""
    from transformers import AutoTokenizer

    from noodle.serve.build import build_server

    served = build_server(model_dir, slow_plan(plan_doc, 30.0), AutoTokenizer.from_pretrained(model_dir), emulate=True)
    with app_server(served) as base:
        body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 200, "temperature": 0}).encode()
        sock = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        deadline = time.monotonic() + 10
        while (served.runtime.stats().tokens_generated < 10) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert served.runtime.stats().in_flight == 1 and served.runtime.stats().tokens_generated >= 10
        sock.close()  # 200 tokens at 30 ms would take 6 s
        deadline = time.monotonic() + 10
        while served.runtime.stats().in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = served.runtime.stats()
        assert stats.in_flight == 0 and served.runtime.in_flight == 0
        assert stats.tokens_generated < 150  # stopped long before max_tokens
