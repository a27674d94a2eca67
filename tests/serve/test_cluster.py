"""End to end: ``noodle serve --cluster`` and ``noodle worker --join`` processes on 127.0.0.1.

No cluster figure is written by hand: the workers measure themselves, the coordinator plans
over them, a killed worker triggers a re-plan, a joining one is weighed (and planned in when
it pays), and ``noodle cluster export`` solves. Every process is stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from .servers import start_serve, wait_ready

TOKEN = "cluster-test-token"
PROMPT = "The planner measures"


def _worker(model_dir: Path, base: str, name: str, cache: Path, log: Path, join_timeout_s: float = 60,
            extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NOODLE_TOKEN": TOKEN}
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "noodle.cli.main", "worker", "--model", str(model_dir), "--port", "0",
                                 "--join", base, "--name", name, "--cache-dir", str(cache), "--threads", "1",
                                 "--join-timeout", str(join_timeout_s), *extra],
                                stdout=fh, stderr=subprocess.STDOUT, env=env)  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _cluster(base: str) -> dict[str, Any]:
    return httpx.get(f"{base}/noodle/cluster", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()


def _wait(cond: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _complete(client: Any) -> str:
    out = client.completions.create(model="gpt2-tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12
    return str(out.choices[0].text)


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            _stop(p)


def test_join_leave_rejoin_and_export(model_dir: Path, tmp_path: Path) -> None:
    from openai import OpenAI

    cache = tmp_path / "cache"
    args = ["--model", str(model_dir), "--cluster", "--token", TOKEN, "--min-workers", "3", "--heartbeat-timeout", "2",
            "--concurrency", "4", "--served-model-name", "gpt2-tiny"]  # fmt: skip
    with start_serve(args, ready=False) as sp, _processes() as procs:
        logs = {f"w{i}": tmp_path / f"w{i}.log" for i in range(1, 5)}
        workers = {n: _worker(model_dir, sp.base, n, cache, logs[n]) for n in ("w1", "w2", "w3")}
        procs.extend(workers.values())
        wait_ready(sp.base, timeout_s=180, proc=sp.proc)
        status = _cluster(sp.base)
        assert sorted(n["id"] for n in status["nodes"]) == ["w1", "w2", "w3"]
        assert all(n["alive"] and n["decode_ms"] > 0 and n["total_memory_bytes"] > 0 for n in status["nodes"])
        assert status["replans"][0]["reason"] == "start" and status["predicted_tps"] > 0

        client = OpenAI(base_url=f"{sp.base}/v1", api_key="unused", max_retries=0, timeout=120)
        expected = _complete(client)
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda _: _complete(client), range(4))) == [expected] * 4

        # a worker that runs a stage dies: requests sent during the outage wait, then succeed on a new plan
        victim = next(n["id"] for n in status["nodes"] if n["stages"])
        t_kill = time.time()
        workers[victim].kill()
        with ThreadPoolExecutor(4) as pool:
            during = [pool.submit(_complete, client) for _ in range(4)]
            left = _wait(lambda: [r for r in _cluster(sp.base)["replans"] if victim in r["reason"]], 60, "a re-plan")[0]
            assert [f.result() for f in during] == [expected] * 4
        death_to_serving = left["t"] - t_kill
        assert victim not in left["after"]
        assert _complete(client) == expected

        # a new worker joins (its costs come from the cache): it is weighed, and planned in when it pays
        t_join = time.time()
        procs.append(_worker(model_dir, sp.base, "w4", cache, logs["w4"]))
        _wait(lambda: any(n["id"] == "w4" and n["alive"] for n in _cluster(sp.base)["nodes"]), 120, "w4 to join")
        joined_s = time.time() - t_join

        def weighed() -> Any:
            st = _cluster(sp.base)
            events = httpx.get(f"{sp.base}/noodle/status", timeout=10).json()["events"]
            after = [r for r in st["replans"] if r["t"] > t_join and r["reason"].startswith("nodes changed")]
            kept = [e for e in events if e["t"] > t_join and "keeping" in e["message"]]
            return after or kept

        decision = _wait(weighed, 60, "the join to be weighed")
        join_replan = decision[0] if "after" in decision[0] else None
        if join_replan is not None:
            assert join_replan["after_tps"] > join_replan["before_tps"] * 1.10
        assert "cached decode" in logs["w4"].read_text()
        assert _complete(client) == expected

        metrics = httpx.get(f"{sp.base}/metrics", timeout=10).text
        assert 'noodle_cluster_nodes{state="dead"} 1.0' in metrics
        assert "noodle_replans_total" in metrics

        exported = tmp_path / "cluster.yaml"
        out = subprocess.run([sys.executable, "-m", "noodle.cli.main", "cluster", "export", "--url", sp.base, "--token", TOKEN],
                             capture_output=True, check=True, timeout=120)  # fmt: skip
        exported.write_bytes(out.stdout)
        solved = subprocess.run([sys.executable, "-m", "noodle.cli.main", "solve", str(exported), "--out",
                                 str(tmp_path / "plan.json")], capture_output=True, timeout=300)  # fmt: skip
        assert solved.returncode == 0, solved.stderr.decode()
        plan = json.loads((tmp_path / "plan.json").read_text())
        assert {s["node"] for s in plan["stages"]} <= {"w1", "w2", "w3", "w4"} - {victim}

        table = subprocess.run([sys.executable, "-m", "noodle.cli.main", "cluster", "status", "--url", sp.base, "--token", TOKEN],
                               capture_output=True, check=True, timeout=120, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
        assert "dead" in table.stdout.decode() and "re-plan" in table.stdout.decode()
        print(f"\ncluster timings: node death -> serving again {death_to_serving:.2f} s "
              f"(re-plan held requests {left['seconds']:.2f} s); join -> registered {joined_s:.2f} s; "
              + (f"join -> new plan serving {join_replan['t'] - t_join:.2f} s "
                 f"({join_replan['before_tps']:.0f} -> {join_replan['after_tps']:.0f} tokens/s predicted)"
                 if join_replan else "join did not pay: plan kept"))  # fmt: skip


@pytest.mark.parametrize("url", ["http://127.0.0.1:9"])
def test_join_unreachable_coordinator_is_one_line(model_dir: Path, tmp_path: Path, url: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NOODLE_TOKEN": TOKEN}
    out = subprocess.run([sys.executable, "-m", "noodle.cli.main", "worker", "--model", str(model_dir), "--port", "0",
                          "--join", url, "--cache-dir", str(tmp_path), "--join-timeout", "1"],
                         capture_output=True, timeout=180, env=env)  # fmt: skip
    err = out.stderr.decode()
    assert out.returncode == 1
    assert "no coordinator answers after 1 s" in err and "Traceback" not in err


@pytest.mark.parametrize(("args", "message"), [
    (["cluster", "status", "--url", "http://127.0.0.1:9"], "--url: cannot reach http://127.0.0.1:9"),
    (["cluster", "export", "--url", "127.0.0.1:9"], "--url: '127.0.0.1:9' is not an http(s) URL"),
    (["cluster", "export", "--links", "star"], "--links: 'star' is not a links mode; give one of direct, relay"),
    (["serve", "--model", "MODEL", "--cluster"], "--cluster: needs --token"),
    (["serve", "--model", "MODEL", "--cluster", "--token", "t", "--spec", "x.yaml"], "--cluster: plans over the workers"),
])  # fmt: skip
def test_cluster_flags_fail_in_one_line(model_dir: Path, args: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NOODLE_TOKEN"}
    cmd = [sys.executable, "-m", "noodle.cli.main", *(str(model_dir) if a == "MODEL" else a for a in args)]
    out = subprocess.run(cmd, capture_output=True, timeout=120, env=env)
    err = out.stderr.decode()
    assert out.returncode != 0 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize(("args", "message"), [
    (["--ready-file", "ready"], "--ready-file: needs --join"),
    (["--join", "http://127.0.0.1:9", "--token", "t", "--ready-file", "/no/such/dir/ready"],
     "--ready-file: /no/such/dir is not a folder"),
    (["--join", "http://127.0.0.1:9", "--token", "t", "--leave-timeout", "-1"], "--leave-timeout: must be"),
    (["--join", "http://127.0.0.1:9", "--token", "t", "--leave-timeout", "nan"], "--leave-timeout: must be"),
    (["--join", "http://127.0.0.1:9", "--token", "t", "--leave-timeout", "601"], "--leave-timeout: must be"),
])  # fmt: skip
def test_worker_leave_flags_fail_in_one_line(model_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                             message: str) -> None:  # fmt: skip
    from noodle.cli.main import main

    assert main(["worker", "--model", str(model_dir), "--port", "0", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
