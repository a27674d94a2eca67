"""The worker's side of ``noodle worker --join URL``: measure this device, register, send heartbeats.

A joining worker measures itself once per (device, model, dtype, threads): the model's
placement units timed on the worker's own device by the profiler engine (decode step per
unit at the planner's batch sizes, prefill per token per unit, weight and KV bytes per
unit: :func:`~noodle.profile.unitcosts.measure_unit_costs`, a short run: one warm-up
iteration, then medians over a few; then the stage runner's fixed work per step beyond
those units: :func:`~noodle.executors.overhead.measure_step_overhead`), its total and
free memory and its torch threads. The figures are cached as JSON (format
``noodle.unit-costs/1``; an older cache file, or one without the step overhead, is
measured again) under
``<cache dir>/<device>-<model hash>-<dtype>-t<threads>.json`` (default
``~/.cache/noodle``), so a restarted worker joins at once. Each file records when it was measured
(``measured_at``) and the machine's load then (``load_per_cpu``, the 1-minute load average per CPU);
it is reused while it is younger than ``CACHE_MAX_AGE_S`` (a day) and unless it was measured on a
busy machine (``load_per_cpu`` at least ``BUSY_LOAD``) that is now at most half as loaded: then, as
for a file without these fields, the worker measures again (:func:`stale_reason`). It then POSTs them to
``URL/noodle/cluster/join`` with ``Authorization: Bearer <token>`` and sends a
heartbeat (load, free memory) every ``heartbeat_s`` the coordinator asked for; a
heartbeat the coordinator does not recognise (it restarted) joins again.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeGuard

from noodle.errors import ExecutorError
from noodle.models.card import DEFAULT_CACHE_DIR, weights_hash
from noodle.models.card import folder_hash as model_hash
from noodle.profile.unitcosts import UNIT_COSTS_FORMAT

__all__ = ["model_hash", "weights_hash", "device_info", "measure_model", "whole_model_ms", "self_report", "slowed_report", "Joiner",
           "DEFAULT_CACHE_DIR"]

log = logging.getLogger(__name__)

MEASURE_PROMPT_TOKENS = 32
MEASURE_BATCH_SIZES = (1,)  # the batch sizes the planner prices: noodle serve --cluster steps one sequence per group


def device_info(device: str) -> dict[str, Any]:
    """Kind, name, total and free memory (bytes) and torch threads of ``device`` (cpu, cuda[:N], mps, xpu)."""
    import psutil
    import torch

    from noodle.executors.devices import parse_device

    dev = parse_device(device, field="--device")
    kind = dev.type
    vm = psutil.virtual_memory()
    total, free, name = int(vm.total), int(vm.available), "cpu"
    if kind == "cuda":
        idx = dev.index or 0
        free, total = (int(x) for x in torch.cuda.mem_get_info(idx))
        name = torch.cuda.get_device_name(idx)
    elif kind == "mps":
        name = "apple-mps"
    elif kind == "cpu":
        import platform

        name = platform.processor() or platform.machine() or "cpu"
    return {"kind": kind, "name": name, "total_memory_bytes": total, "free_memory_bytes": free,
            "threads": int(torch.get_num_threads())}  # fmt: skip


def measure_model(model_dir: Path, device: str = "cpu", *, batch_sizes: tuple[int, ...] = MEASURE_BATCH_SIZES,
                  prompt_tokens: int = MEASURE_PROMPT_TOKENS, decode_steps: int = 8, repeats: int = 4) -> dict[str, Any]:  # fmt: skip
    """Time the model's units on ``device`` with the profiler engine (:func:`~noodle.profile.unitcosts.measure_unit_costs`)."""
    from transformers import AutoModelForCausalLM

    from noodle.executors.kvbudget import max_positions
    from noodle.executors.slicing import read_config
    from noodle.executors.overhead import measure_step_overhead
    from noodle.profile.unitcosts import measure_unit_costs

    config = read_config(model_dir)
    positions = max_positions(config) or 2048
    p = max(1, min(prompt_tokens, positions // 2))
    steps = max(1, min(decode_steps, positions - p - 1))
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    costs = measure_unit_costs(model, device, batch_sizes=batch_sizes, prompt_tokens=p, decode_tokens=steps,
                               iterations=repeats)  # fmt: skip
    del model
    costs["step_overhead_ms"] = measure_step_overhead(model_dir, costs, device, decode_tokens=steps, repeats=repeats)
    return costs


CACHE_MAX_AGE_S = 24 * 3600.0  # a cached measurement older than this is taken again
BUSY_LOAD = 1.0  # load per CPU from which a measurement counts as taken under load


def load_per_cpu() -> float:
    """The 1-minute load average per CPU (0.0 where the platform has none)."""
    try:
        return os.getloadavg()[0] / max(1, os.cpu_count() or 1)
    except (AttributeError, OSError):
        return 0.0


def stale_reason(costs: dict[str, Any], *, now: float, load: float) -> str | None:
    """Why a cached measurement must be taken again (too old, or taken under a load gone since), or None."""
    at, then = costs.get("measured_at"), costs.get("load_per_cpu")
    if not isinstance(at, (int, float)) or not isinstance(then, (int, float)):
        return "it records no time or load of measurement"
    if now - at > CACHE_MAX_AGE_S or now < at:
        return f"it is {(now - at) / 3600:.1f} h old (kept {CACHE_MAX_AGE_S / 3600:g} h)"
    if then >= BUSY_LOAD and load <= then / 2:
        return f"it was measured under load {then:.2f} per CPU, the machine is at {load:.2f} now"
    return None


def _valid_cache(costs: object) -> TypeGuard[dict[str, Any]]:
    """A cached report in the current format (an older whole-model one, or one without the step overhead, is
    measured again)."""
    return (isinstance(costs, dict) and costs.get("format") == UNIT_COSTS_FORMAT and isinstance(costs.get("units"), list)
            and isinstance(costs.get("step_overhead_ms"), dict))


def whole_model_ms(costs: dict[str, Any]) -> tuple[float, float]:
    """(decode ms, prefill ms per token) of the whole model at the report's batch size: the sums over its units."""
    b = str(costs["batch_size"])
    return (sum(float(u["decode_ms"][b]) for u in costs["units"]),
            sum(float(u["prefill_ms_per_token"]) for u in costs["units"]))  # fmt: skip


def self_report(model_dir: Path, device: str, cache_dir: Path | None = None) -> dict[str, Any]:
    """Device facts plus the measured costs (from the cache when this device, model and dtype were measured)."""
    info = device_info(device)
    mhash = model_hash(model_dir)
    from noodle.executors.slicing import read_config

    config = read_config(model_dir)
    dtype = str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    key = f"{info['kind']}-{info['name']}-{mhash}-{dtype}-t{info['threads']}"
    key = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    folder = (cache_dir or DEFAULT_CACHE_DIR).expanduser()
    path = folder / f"{key}.json"
    costs: dict[str, Any] | None = None
    try:
        costs = json.loads(path.read_text())
        costs["cached"] = True
    except (OSError, ValueError):
        costs = None
    stale = stale_reason(costs, now=time.time(), load=load_per_cpu()) if _valid_cache(costs) else "older format"
    if stale is not None:
        if costs is not None:
            log.info("measuring again: the cached costs in %s are stale (%s)", path, stale)
        load = load_per_cpu()
        costs = measure_model(model_dir, device)
        costs["measured_at"], costs["load_per_cpu"] = time.time(), round(max(load, load_per_cpu()), 3)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(costs, indent=1))
        except OSError as exc:
            log.warning("cannot cache the measured costs in %s (%s)", path, exc.strerror)
        costs["cached"] = False
    return {"device": info, "model_hash": mhash, "weights_sha256": weights_hash(model_dir, cache_dir), "costs": costs,
            "cache_file": str(path)}


def slowed_report(report: dict[str, Any], factor: float) -> dict[str, Any]:
    """``report`` (:func:`self_report`'s) as a device ``factor`` x slower measures it: every unit's times x ``factor``.

    For ``noodle worker --emulate-slowdown F --slowdown-after-s 0``: a worker emulating a device that is slow
    from its first step reports itself slow when it joins, as a real slow device would measure itself. The
    cache keeps the real measurement (the factor is applied on top, each time); the report says
    ``emulated_slowdown`` (the coordinator ignores the field). ``factor`` 1 returns ``report`` unchanged.
    """
    if factor == 1.0:
        return report
    costs = dict(report["costs"])
    costs["units"] = [{**u, "decode_ms": {b: float(ms) * factor for b, ms in u["decode_ms"].items()},
                       "prefill_ms_per_token": float(u["prefill_ms_per_token"]) * factor} for u in costs["units"]]  # fmt: skip
    if isinstance(costs.get("step_overhead_ms"), dict):  # the throttle stretches the whole step, overhead included
        costs["step_overhead_ms"] = {k: float(v) * factor for k, v in costs["step_overhead_ms"].items()}
    costs["emulated_slowdown"] = factor
    return {**report, "costs": costs}


class _NameInUse(Exception):
    """The coordinator has a live node of this name (409 name_in_use): retried until the join gives up."""


def _error(resp: Any) -> tuple[str, str]:
    """(message, code) of a coordinator's error answer."""
    try:
        err = resp.json().get("error", {})
        return str(err.get("message", resp.text)), str(err.get("code") or "")
    except (ValueError, AttributeError):
        return resp.text, ""


class Joiner:
    """Registers a worker with a coordinator and keeps it registered (heartbeats) on a daemon thread.

    Args:
        url: the coordinator's base URL (``http://host:port``).
        token: the bearer token (the coordinator's cluster token).
        node_id: this worker's name in the cluster.
        address: ``host:port`` the coordinator reaches this worker's gRPC server at.
        report: :func:`self_report`'s figures (or a function computing them).
        give_up_s: how long to retry the first join before failing.
        on_fail: called with a one-line error when the first join fails for good.
        ready_file: created once the coordinator accepted the join, removed when the worker leaves (a
            Kubernetes readiness probe tests it: a rolling update waits for the join, not for the port).
    """

    def __init__(self, url: str, token: str, node_id: str, address: str,
                 report: dict[str, Any] | Callable[[], dict[str, Any]], *, give_up_s: float = 60.0,
                 on_fail: Callable[[str], None] | None = None, ready_file: Path | None = None) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.token = token
        self.node_id = node_id
        self.address = address
        self._report = report
        self.give_up_s = give_up_s
        self.on_fail = on_fail or (lambda line: print(line, file=sys.stderr, flush=True))
        self.heartbeat_s = 2.0
        self.joined = threading.Event()
        self.secret = ""  # issued by the coordinator at join; every heartbeat carries it
        self.failed: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready_file = ready_file
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)  # a restarted container finds its predecessor's

    def start(self) -> Joiner:
        self._thread = threading.Thread(target=self._run, name="noodle-join", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _post(self, path: str, body: dict[str, Any], timeout_s: float = 10.0) -> Any:
        import httpx

        return httpx.post(f"{self.url}{path}", json=body, headers={"Authorization": f"Bearer {self.token}"},
                          timeout=timeout_s)  # fmt: skip

    def leave(self, wait_s: float) -> str:
        """Stop heartbeating and tell the coordinator this worker leaves; returns once it serves without it (or
        ``wait_s`` passed), so the steps in flight here finish. One line on what happened."""
        import httpx

        self._stop.set()
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        if not self.joined.is_set() or wait_s <= 0:
            return "not leaving the cluster (not joined)" if wait_s > 0 else "leaving without telling the coordinator"
        t0 = time.monotonic()
        try:
            resp = self._post("/noodle/cluster/leave", {"id": self.node_id, "secret": self.secret, "wait_s": wait_s},
                              timeout_s=wait_s + 10.0)  # fmt: skip
        except httpx.HTTPError as exc:
            return f"could not tell {self.url} this worker leaves ({type(exc).__name__}: {exc}); it will find out"
        if resp.status_code != 200:
            return f"{self.url} refused the leave ({resp.status_code}: {_error(resp)[0]})"
        answer = resp.json()
        if answer.get("in_plan"):
            return f"left {self.url}, but it still served a plan with this worker after {wait_s:g} s"
        return f"left {self.url}: it serves without this worker ({time.monotonic() - t0:.2f} s)"

    def _payload(self) -> dict[str, Any]:
        if callable(self._report):
            self._report = self._report()
        return {"id": self.node_id, "address": self.address, **self._report}

    def _join_once(self) -> None:
        """One join; raises ExecutorError (refused: do not retry), _NameInUse (retry) or httpx errors (retry)."""
        resp = self._post("/noodle/cluster/join", self._payload())
        if resp.status_code in (401, 403, 404, 409, 400, 422):
            msg, code = _error(resp)
            if code == "name_in_use":
                raise _NameInUse(msg)
            raise ExecutorError(f"--join {self.url}: the coordinator refused this worker ({resp.status_code}: {msg})")
        resp.raise_for_status()
        answer = resp.json()
        self.heartbeat_s = float(answer.get("heartbeat_s", self.heartbeat_s))
        self.secret = str(answer.get("secret", ""))
        self.joined.set()
        if self.ready_file is not None:
            self.ready_file.write_text(f"{self.node_id} joined {self.url}\n")

    def _run(self) -> None:
        import httpx

        try:
            report = self._payload()
        except Exception as exc:  # noqa: BLE001 - a measurement failure ends the join with one line
            self._fail(f"noodle worker: measuring this device failed: {type(exc).__name__}: {exc}")
            return
        c = report["costs"]
        decode, prefill = whole_model_ms(c)
        print(f"noodle worker: {'cached' if c.get('cached') else 'measured'} decode {decode:.2f} ms, "
              f"prefill {prefill:.3f} ms/token over {len(c['units'])} units on {report['device']['kind']}"
              f"{'; step overhead %.3f ms' % c['step_overhead_ms']['decode_ms'] if c.get('step_overhead_ms') else ''}"
              + (f" (x{c['emulated_slowdown']:g}: emulated slowdown)" if c.get("emulated_slowdown") else ""),
              flush=True)  # fmt: skip
        deadline, delay, said = time.monotonic() + self.give_up_s, 0.25, ""
        while not self._stop.is_set():
            try:
                self._join_once()
                break
            except ExecutorError as exc:
                self._fail(f"noodle worker: {exc}")
                return
            except (httpx.HTTPError, _NameInUse) as exc:
                if time.monotonic() + delay > deadline:
                    why = (f"the coordinator refused this worker for {self.give_up_s:g} s (409: {exc})"
                           if isinstance(exc, _NameInUse) else
                           f"no coordinator answers after {self.give_up_s:g} s ({type(exc).__name__}: {exc}); start "
                           "`noodle serve --cluster` there or fix the URL")  # fmt: skip
                    self._fail(f"noodle worker: --join {self.url}: {why}")
                    return
                if isinstance(exc, _NameInUse) and str(exc) != said:
                    said = str(exc)
                    print(f"noodle worker: --join {self.url}: {exc}; retrying for {self.give_up_s:g} s", flush=True)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
        print(f"noodle worker: joined {self.url} as {self.node_id} ({self.address})", flush=True)
        self._beat()

    def _beat(self) -> None:
        import httpx
        import psutil

        proc = psutil.Process(os.getpid())
        proc.cpu_percent(None)
        warned = False
        while not self._stop.wait(self.heartbeat_s):
            body = {"id": self.node_id, "load": proc.cpu_percent(None) / 100.0, "secret": self.secret,
                    "free_memory_bytes": int(psutil.virtual_memory().available)}  # fmt: skip
            try:
                resp = self._post("/noodle/cluster/heartbeat", body)
                if resp.status_code == 403 and _error(resp)[1] == "refused":
                    self._fail(f"noodle worker: --join {self.url}: {_error(resp)[0]}")
                    return
                if resp.status_code in (403, 404):  # the coordinator restarted (or our record was replaced): join again
                    self._join_once()
                warned = False
            except (httpx.HTTPError, ExecutorError, _NameInUse) as exc:
                if isinstance(exc, ExecutorError):
                    self._fail(f"noodle worker: {exc}")
                    return
                if not warned:
                    log.warning("heartbeat to %s failed (%s); retrying every %.0f s", self.url, exc, self.heartbeat_s)
                    warned = True

    def _fail(self, line: str) -> None:
        self.failed = line
        self.on_fail(line)
