"""Shutdown and no live worker (issue 24, item 4), with real ``noodle serve --cluster`` and ``noodle worker`` processes.

The first SIGTERM or SIGINT ends the coordinator in each state tested: waiting for
``--min-workers`` (it used to wait for the stage-loading thread, which waited for a stop flag
set only after that wait), and serving. With no live worker left ``/readyz`` says not ready and
requests get 503 with ``Retry-After`` at once instead of waiting for ``--request-timeout``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from .servers import ServeProc, start_serve, wait_ready
from .test_cluster import TOKEN, _processes, _wait, _worker

MODEL = "gpt2-tiny"
DRAIN_S = 5


def _cluster_args(model_dir: Path, min_workers: int) -> list[str]:
    return ["--model", str(model_dir), "--cluster", "--token", TOKEN, "--min-workers", str(min_workers),
            "--heartbeat-timeout", "2", "--drain-timeout", str(DRAIN_S), "--served-model-name", MODEL,
            "--request-timeout", "600"]  # fmt: skip


def _ends_on_first(sp: ServeProc, sig: int) -> None:
    sp.proc.send_signal(sig)
    try:
        code = sp.proc.wait(timeout=DRAIN_S + 25)  # the drain bound, plus closing on a busy machine
    except Exception:
        raise AssertionError(f"still running after one {signal.Signals(sig).name}:\n{sp.log()[-3000:]}") from None
    assert code == 0, sp.log()[-3000:]
    assert "noodle serve: stopped" in sp.log() and "Traceback" not in sp.log(), sp.log()[-3000:]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-cache")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_waiting_for_workers_ends_on_the_first_signal(model_dir: Path, sig: int) -> None:
    with start_serve(_cluster_args(model_dir, 3), ready=False) as sp:
        assert httpx.get(f"{sp.base}/healthz", timeout=10).status_code == 200
        _wait(lambda: "waiting for 3 worker" in sp.log(), 30, "the waiting line")
        assert httpx.get(f"{sp.base}/readyz", timeout=10).status_code == 503
        _ends_on_first(sp, sig)


@pytest.fixture()
def served_by_one_worker(model_dir: Path, tmp_path: Path, cache: Path) -> Iterator[tuple[ServeProc, object]]:
    with start_serve(_cluster_args(model_dir, 1), ready=False) as sp, _processes() as procs:
        worker = _worker(model_dir, sp.base, "w1", cache, tmp_path / "w1.log")
        procs.append(worker)
        wait_ready(sp.base, timeout_s=240, proc=sp.proc)
        client = openai.OpenAI(base_url=f"{sp.base}/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4
        yield sp, worker


def test_serving_ends_on_the_first_sigterm(served_by_one_worker: tuple[ServeProc, object]) -> None:
    sp, worker = served_by_one_worker
    _ends_on_first(sp, signal.SIGTERM)
    assert worker.poll() is None  # type: ignore[attr-defined]  # the worker outlives its coordinator


def test_no_live_worker_is_503_with_retry_after(served_by_one_worker: tuple[ServeProc, object]) -> None:
    sp, worker = served_by_one_worker
    worker.kill()  # type: ignore[attr-defined]
    ready = _wait(lambda: (r := httpx.get(f"{sp.base}/readyz", timeout=10)).status_code == 503 and r, 30,
                  "/readyz to say not ready")  # fmt: skip
    assert ready.json()["ready"] is False and "no live worker" in ready.json()["error"]
    t0 = time.perf_counter()
    r = httpx.post(f"{sp.base}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4}, timeout=60)
    print(f"refused in {time.perf_counter() - t0:.3f} s (--request-timeout is 600 s)")
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
    assert r.json()["error"]["code"] == "unavailable" and "no live worker" in r.json()["error"]["message"]
    _ends_on_first(sp, signal.SIGTERM)  # serving with no worker left ends on the first signal too
