"""Cluster benchmark: ``noodle serve --cluster`` and ``noodle worker --join`` processes on loopback.

Runs the issue-13 scenario with clients sending requests all the time (the official ``openai``
client, greedy, 12 tokens each), on emulated devices so that what pays does not depend on how this
machine's cores are shared (the same scenario as tests/serve/test_cluster_e2e.py), and measures from
the client side:

1. three slow workers join (``--emulate-slowdown 4 --slowdown-after-s 0``: 4x slower devices that
   measure themselves so; costs measured once, then read from the shared cache); the coordinator plans;
2. a normal worker joins: time from its process start (and from its registration) to the new plan
   serving; a fifth, slow again, cannot beat it: the plan is kept;
3. the normal worker throttles 10x mid-run: time from the throttle starting to the coordinator
   moving units off it (its measured compute against the plan's prediction);
4. a worker holding a stage is killed (SIGKILL): time until a request sent after the kill completes,
   and until the new plan serves;
5. tokens/s the clients got in a window before each cause and after each re-plan.

Writes bench/results/cluster.{json,md}. ``ClusterLab`` and ``Load`` are also what
tests/serve/test_cluster_e2e.py drives the processes with.

    python -m bench.cluster [--window 6] [--slowdown 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

__all__ = ["ClusterLab", "Load", "join_decisions", "measure_cache", "run_scenario"]

TOKEN = "cluster-bench-token"
PROMPT = "The planner measures"
MODEL_NAME = "gpt2-tiny"
_LISTEN = re.compile(r"on http://127\.0\.0\.1:(\d+)/v1")
_THROTTLE = re.compile(r"emulated slowdown ON.*unix time ([0-9.]+)")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "noodle.cli.main", *args]


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.1) -> Any:
    """``cond()``'s first truthy value, polled every ``every_s``; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def measure_cache(model_dir: Path, cache: Path) -> Path:
    """Measure this machine once (as a joining worker would, 1 torch thread) into ``cache``; returns the file."""
    import torch

    from noodle.serve.joining import self_report

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Path(self_report(model_dir, "cpu", cache)["cache_file"])
    finally:
        torch.set_num_threads(before)


class ClusterLab:
    """One ``noodle serve --cluster`` and its ``noodle worker --join`` processes; every one stopped on exit."""

    def __init__(self, model_dir: Path, workdir: Path, serve_args: list[str] | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.workdir = Path(workdir)
        self.serve_args = serve_args or []
        self.serve: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.started: dict[str, float] = {}
        self.base = ""

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> ClusterLab:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NOODLE_TOKEN": TOKEN}
        try:
            with open(self.workdir / "serve.log", "wb") as fh:
                self.serve = subprocess.Popen(_cli("serve", "--model", str(self.model_dir), "--cluster", "--host", "127.0.0.1",
                                                   "--port", "0", "--threads", "1", "--served-model-name", MODEL_NAME,
                                                   *self.serve_args), stdout=fh, stderr=subprocess.STDOUT, env=env)  # fmt: skip
            port = wait_for(lambda: _LISTEN.search(self.log("serve")) or self.serve.poll() is not None, 120, "serve to listen")
            if not isinstance(port, re.Match):
                raise RuntimeError(f"noodle serve exited:\n{self.log('serve')}")
            self.base = f"http://127.0.0.1:{port.group(1)}"
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.workers.values():
            with contextlib.suppress(Exception):
                _stop(proc)
        if self.serve is not None:
            _stop(self.serve, 30.0)

    def worker(self, name: str, cache: Path, *extra: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NOODLE_TOKEN": TOKEN}
        with open(self.workdir / f"{name}.log", "wb") as fh:
            proc = subprocess.Popen(_cli("worker", "--model", str(self.model_dir), "--port", "0", "--join", self.base,
                                         "--name", name, "--cache-dir", str(cache), "--threads", "1",
                                         "--join-timeout", "60", *extra), stdout=fh, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        self.workers[name] = proc
        self.started[name] = time.time()
        return proc

    def kill(self, name: str) -> float:
        """SIGKILL a worker; returns the wall-clock time of the kill."""
        t = time.time()
        self.workers[name].kill()
        self.workers[name].wait(timeout=10)
        return t

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        def ready() -> bool:
            if self.serve is not None and self.serve.poll() is not None:
                raise RuntimeError(f"noodle serve exited:\n{self.log('serve')}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200
            return False

        wait_for(ready, timeout_s, "the first plan to serve", every_s=0.2)

    def cluster(self) -> dict[str, Any]:
        return httpx.get(f"{self.base}/noodle/cluster", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()

    def events(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.base}/noodle/status", timeout=10).json()["events"]

    def replans(self, since: float = 0.0, prefix: str = "") -> list[dict[str, Any]]:
        return [r for r in self.cluster()["replans"] if r["t"] > since and r["reason"].startswith(prefix)]

    def holder(self, name: str) -> list[tuple[int, int]]:
        """Unit ranges ``name`` holds in the served plan."""
        st = self.cluster()
        return [(s["start"], s["end"]) for s in _stages(st["plan"]) if s["node"] == name]

    def throttled_at(self, name: str) -> float | None:
        m = _THROTTLE.search(self.log(name))
        return float(m.group(1)) if m else None


def _stages(layout: str) -> list[dict[str, Any]]:
    out = []
    for m in re.finditer(r"([A-Za-z0-9_.@:-]+)\[(\d+):(\d+)\)", layout):
        out.append({"node": m.group(1), "start": int(m.group(2)), "end": int(m.group(3))})
    return out


class Load:
    """``clients`` threads sending greedy completions back to back; records (end time, tokens, text) of each."""

    def __init__(self, base: str, clients: int = 4, max_tokens: int = 12) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        self.clients = clients
        self.max_tokens = max_tokens
        self.done: list[tuple[float, float, int, str]] = []  # (submitted, finished, tokens, text)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def one(self) -> str:
        t0 = time.time()
        out = self.client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=self.max_tokens, temperature=0)
        n = out.usage.completion_tokens if out.usage else 0
        with self._lock:
            self.done.append((t0, time.time(), n, str(out.choices[0].text)))
        return str(out.choices[0].text)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.one()
            except Exception as exc:  # noqa: BLE001 - recorded; the test asserts there are none
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(0.5)

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=130)

    def texts(self) -> set[str]:
        with self._lock:
            return {d[3] for d in self.done}

    def tps(self, t0: float, t1: float) -> float:
        """Tokens/s of the requests that finished in ``[t0, t1)``."""
        with self._lock:
            n = sum(d[2] for d in self.done if t0 <= d[1] < t1)
        return n / (t1 - t0) if t1 > t0 else 0.0

    def first_after(self, t: float) -> float | None:
        """When the first request submitted after ``t`` finished."""
        with self._lock:
            ends = [d[1] for d in self.done if d[0] >= t]
        return min(ends) if ends else None


def join_decisions(lab: ClusterLab, since: float, name: str) -> list[dict[str, Any]]:
    """The coordinator's decisions on ``name``'s join since ``since``: its "keeping" events (``message``), then the
    re-plans it caused (``reason``)."""
    kept = [e for e in lab.events() if e["t"] > since and e["message"].startswith("nodes changed")
            and f"{name} joined" in e["message"]]  # fmt: skip
    return kept + [r for r in lab.replans(since, "nodes") if f"{name} joined" in r["reason"]]


def _joined(lab: ClusterLab, load: Load, name: str, t_start: float, window_s: float) -> dict[str, Any]:
    joined = wait_for(lambda: [d for d in join_decisions(lab, t_start, name) if "reason" in d], 120,
                      f"{name} to be planned in")[0]  # fmt: skip
    reg = next(n for n in lab.cluster()["nodes"] if n["id"] == name)
    time.sleep(window_s)
    return {"node": name, "start_to_new_plan_s": joined["t"] - t_start, "registered_to_new_plan_s": joined["t"] - reg["joined_at"],
            "held_s": joined["seconds"], "tps_before": load.tps(t_start - window_s, t_start),
            "tps_after": load.tps(joined["t"], joined["t"] + window_s),
            "predicted": [joined.get("current_tps", joined["before_tps"]), joined["after_tps"]], "plan": joined["after"]}  # fmt: skip


SLOW = ("--emulate-slowdown", "4", "--slowdown-after-s", "0")


def run_scenario(model_dir: Path, workdir: Path, *, window_s: float = 6.0, slowdown: float = 10.0,
                 throttle_after_s: float = 40.0, log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """The scenario of the module docstring; returns the figures (times in seconds, rates in tokens/s)."""
    cache = workdir / "cache"
    measure_cache(model_dir, cache)
    res: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg_start": list(os.getloadavg()), "window_s": window_s}
    args = ["--min-workers", "3", "--heartbeat-timeout", "5", "--concurrency", "4"]
    with ClusterLab(model_dir, workdir, args) as lab:
        t0 = time.time()
        for n in ("w1", "w2", "w3"):
            lab.worker(n, cache, *SLOW)
        lab.wait_ready()
        start = lab.replans(prefix="start")[0]
        res["start"] = {"seconds_to_first_plan": start["t"] - t0, "plan": start["after"], "predicted_tps": start["after_tps"]}
        log(f"first plan {start['after']} after {start['t'] - t0:.1f} s")
        with Load(lab.base) as load:
            time.sleep(window_s)
            t_w4 = time.time()
            lab.worker("w4", cache, "--emulate-slowdown", f"{slowdown:g}", "--slowdown-after-s", f"{throttle_after_s:g}")
            res["join_paying"] = _joined(lab, load, "w4", t_w4, window_s)
            log(f"join w4: {res['join_paying']}")
            t_w5 = time.time()
            lab.worker("w5", cache, *SLOW)
            kept = wait_for(lambda: join_decisions(lab, t_w5, "w5"), 120, "w5 to be weighed")
            res["join_not_paying"] = {"node": "w5", "decision": kept[0].get("message") or f"switched: {kept[0]['after']}",
                                      "to_decision_s": kept[0]["t"] - t_w5}  # fmt: skip
            log(f"join w5: {res['join_not_paying']}")
            t_thr = wait_for(lambda: lab.throttled_at("w4"), throttle_after_s + 60, "w4 to throttle")
            drift = wait_for(lambda: [r for r in lab.replans(t_thr, "drift") if "w4" in r["reason"]], 90, "a drift re-plan")[0]
            time.sleep(window_s)
            res["slowdown"] = {"node": "w4", "factor": slowdown, "to_replan_s": drift["t"] - t_thr, "reason": drift["reason"],
                               "tps_before": load.tps(t_thr - window_s, t_thr), "tps_throttled": load.tps(t_thr, drift["t"]),
                               "tps_after": load.tps(drift["t"], drift["t"] + window_s),
                               "predicted": [drift.get("current_tps", drift["before_tps"]), drift["after_tps"]],
                               "plan": drift["after"]}  # fmt: skip
            log(f"slowdown: {res['slowdown']}")
            victim = _stages(lab.cluster()["plan"])[-1]["node"]
            t_kill = lab.kill(victim)
            left = wait_for(lambda: [r for r in lab.replans(t_kill) if victim in r["reason"]], 60, "the re-plan")[0]
            time.sleep(window_s)
            res["kill"] = {"node": victim, "to_new_plan_s": left["t"] - t_kill,
                           "to_first_request_after_kill_done_s": (load.first_after(t_kill) or float("nan")) - t_kill,
                           "held_s": left["seconds"], "tps_before": load.tps(t_kill - window_s, t_kill),
                           "tps_after": load.tps(left["t"], left["t"] + window_s), "predicted": [left["before_tps"], left["after_tps"]],
                           "plan": left["after"]}  # fmt: skip
            log(f"kill {victim}: {res['kill']}")
        texts = load.texts()
        res["requests"] = {"completed": len(load.done), "errors": len(load.errors), "distinct_texts": len(texts)}
        res["load_avg_end"] = list(os.getloadavg())
    return res


def write_results(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.json").write_text(json.dumps(res, indent=1) + "\n")
    k, j, s, n = res["kill"], res["join_paying"], res["slowdown"], res["join_not_paying"]
    lines = [
        "# Cluster: re-planning on loopback (bench/cluster.py)", "",
        f"gpt2-tiny, `noodle serve --cluster` + `noodle worker --join` processes on 127.0.0.1, 4 clients sending "
        f"greedy 12-token completions back to back (openai client); {res['cpus']} CPU cores shared with other work "
        f"(load average {res['load_avg_start'][0]:.1f} at the start, {res['load_avg_end'][0]:.1f} at the end). "
        f"Throughput is client-side tokens/s over {res['window_s']:g} s windows.", "",
        "| event | time | tokens/s before -> after (client) | predicted tokens/s (current layout -> new plan) | plan after |",
        "|---|---|---|---|---|",
        f"| first plan (3 slow workers, 4x) | {res['start']['seconds_to_first_plan']:.1f} s from starting them | | "
        f"{res['start']['predicted_tps']:.0f} | {res['start']['plan']} |",
        f"| {j['node']} joins (a normal device) | new plan serving {j['start_to_new_plan_s']:.1f} s after its process started, "
        f"{j['registered_to_new_plan_s']:.2f} s after it registered (held {j['held_s']:.2f} s) | {j['tps_before']:.0f} -> "
        f"{j['tps_after']:.0f} | {j['predicted'][0]:.0f} -> {j['predicted'][1]:.0f} | {j['plan']} |",
        f"| {n['node']} joins (slow again) | weighed {n['to_decision_s']:.1f} s after its start | | | "
        f"{n['decision'][:160]} |",
        f"| {s['node']} throttles {s['factor']:g}x | drift re-plan {s['to_replan_s']:.1f} s after the throttle started | "
        f"{s['tps_before']:.0f} -> {s['tps_throttled']:.0f} (throttled) -> {s['tps_after']:.0f} | "
        f"{s['predicted'][0]:.0f} -> {s['predicted'][1]:.0f} | {s['plan']} |",
        f"| {k['node']} killed (SIGKILL) | new plan serving after {k['to_new_plan_s']:.2f} s (held {k['held_s']:.2f} s); first "
        f"request sent after the kill done after {k['to_first_request_after_kill_done_s']:.2f} s | {k['tps_before']:.0f} -> "
        f"{k['tps_after']:.0f} | {k['predicted'][0]:.0f} -> {k['predicted'][1]:.0f} | {k['plan']} |", "",
        f"Requests: {res['requests']['completed']} completed, {res['requests']['errors']} errors, "
        f"{res['requests']['distinct_texts']} distinct text(s) (greedy: one expected).", "",
    ]  # fmt: skip
    (out / "cluster.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=6.0, help="seconds of throughput measured before/after")
    parser.add_argument("--slowdown", type=float, default=10.0, help="the throttled worker's --emulate-slowdown")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    import tempfile

    from noodle.models import init_model

    with tempfile.TemporaryDirectory(prefix="noodle-cluster-bench-") as tmp:
        work = args.workdir or Path(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = init_model("gpt2-tiny", work / "gpt2-tiny", seed=0)
        res = run_scenario(model, work / "run", window_s=args.window, slowdown=args.slowdown)
    write_results(res, args.out)
    print((args.out / "cluster.md").read_text())


if __name__ == "__main__":
    main()
