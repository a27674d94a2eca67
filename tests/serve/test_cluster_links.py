"""End to end: ``noodle serve --cluster`` measures the links between three ``noodle worker --join`` processes.

One worker joins under the address of a proxy that holds every chunk 20 ms each way, so every
link into it must be measured ~20 ms one way (18-40 ms: this box is shared and loaded, so the test waits for a
round of probes, every 10 s, that is not disturbed by the start-up) and the
others about a millisecond or less (under 5 ms), in ``noodle cluster
status`` and in the spec ``noodle cluster export`` prints (which ``noodle solve`` plans). No link
figure is written by hand. Every process is stopped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from ..delayproxy import DelayProxy
from .servers import start_serve, wait_ready
from .test_cluster import TOKEN, _cluster, _complete, _processes, _wait


def _worker(model_dir: Path, base: str, name: str, cache: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NOODLE_TOKEN": TOKEN}
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "noodle.cli.main", "worker", "--model", str(model_dir),
                                 "--join", base, "--name", name, "--cache-dir", str(cache), "--threads", "1",
                                 "--join-timeout", "60", *(extra or ("--port", "0"))],
                                stdout=fh, stderr=subprocess.STDOUT, env=env)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_links_are_measured_and_exported(model_dir: Path, tmp_path: Path) -> None:
    from openai import OpenAI

    cache = tmp_path / "cache"
    args = ["--model", str(model_dir), "--cluster", "--token", TOKEN, "--min-workers", "3", "--heartbeat-timeout", "5",
            "--concurrency", "2", "--served-model-name", "gpt2-tiny", "--probe-interval", "10"]  # fmt: skip
    w3_port = _free_port()
    with DelayProxy(("127.0.0.1", w3_port), delay_s=0.020) as proxy, start_serve(args, ready=False) as sp, \
            _processes() as procs:  # fmt: skip
        procs.append(_worker(model_dir, sp.base, "w1", cache, tmp_path / "w1.log"))
        procs.append(_worker(model_dir, sp.base, "w2", cache, tmp_path / "w2.log"))
        procs.append(_worker(model_dir, sp.base, "w3", cache, tmp_path / "w3.log", "--port", str(w3_port),
                             "--advertise", proxy.address))  # fmt: skip
        wait_ready(sp.base, timeout_s=180, proc=sp.proc)

        def measured() -> list[dict] | None:  # every link probed, each within its bounds (re-probed every 10 s)
            got = _cluster(sp.base)["links"]
            seen.append(got)
            ok = len(got) == 9 and all((18.0 < x["latency_ms"] < 40.0) if x["target"] == "w3" else x["latency_ms"] < 5.0
                                       for x in got)  # fmt: skip
            return got if ok else None

        seen: list[list[dict]] = []
        try:
            links = _wait(measured, 90, "3 coordinator links and 6 worker pairs, those into w3 ~20 ms")
        except AssertionError:
            raise AssertionError(f"last links seen: {seen[-1] if seen else None}") from None
        print("\nlinks: " + ", ".join(f"{x['source']}->{x['target']} {x['latency_ms']:.2f} ms" for x in links))
        assert all(x["bandwidth_gbps"] > 0 and x["bytes"] == 64 * 192 * 4 for x in links)

        client = OpenAI(base_url=f"{sp.base}/v1", api_key="unused", max_retries=0, timeout=120)
        assert _complete(client)  # serving goes on while links are probed

        out = subprocess.run([sys.executable, "-m", "noodle.cli.main", "cluster", "export", "--url", sp.base, "--token", TOKEN],
                             capture_output=True, check=True, timeout=120)  # fmt: skip
        doc = yaml.safe_load(out.stdout)
        pairs = {(p["a"], p["b"]): p for p in doc["cluster"]["links"]["pairs"]}
        assert set(pairs) == {("w1", "w2"), ("w1", "w3"), ("w2", "w3")}, pairs
        assert pairs[("w1", "w2")]["latency_ms"] < 5.0
        assert all(18.0 < pairs[k]["latency_ms"] < 40.0 for k in (("w1", "w3"), ("w2", "w3")))
        exported = tmp_path / "cluster.yaml"
        exported.write_bytes(out.stdout)
        solved = subprocess.run([sys.executable, "-m", "noodle.cli.main", "solve", str(exported), "--out",
                                 str(tmp_path / "plan.json")], capture_output=True, timeout=300)  # fmt: skip
        assert solved.returncode == 0, solved.stderr.decode()

        table = subprocess.run([sys.executable, "-m", "noodle.cli.main", "cluster", "status", "--url", sp.base, "--token", TOKEN],
                               capture_output=True, check=True, timeout=120, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
        text = table.stdout.decode()
        assert "links measured" in text and "w1 -> w3" in text and "(coordinator) -> w2" in text, text
        print("\n" + text)


def test_bad_probe_interval_is_one_line(model_dir: Path) -> None:
    for value in ("-1", "0.5", "nan", "1e9"):
        out = subprocess.run([sys.executable, "-m", "noodle.cli.main", "serve", "--model", str(model_dir), "--cluster",
                              "--token", TOKEN, "--probe-interval", value], capture_output=True, timeout=120)  # fmt: skip
        err = out.stderr.decode()
        assert out.returncode != 0 and "--probe-interval: must be 0 (no link probes) or 1 to 86400 seconds" in err, err
        assert "Traceback" not in err
