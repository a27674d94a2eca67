"""Distributed-executor overhead: local vs torchrpc vs gRPC on loopback, and the TCP floor.

Every mode runs the same plan (``stages`` even stages of the model) and is loaded
once; rounds are interleaved (each round runs every mode once, in a rotating
order) so that the noise of a shared CPU falls on all modes alike. A decode
step's time is the interval between two consecutive tokens leaving greedy
decoding (``on_step`` timestamps), sampling included, the same for every mode.

*Added per hop* is ``(step p50 of the mode - step p50 of local) / (stages + 1)``:
a distributed step crosses the network ``stages + 1`` times (coordinator ->
stage 0 -> ... -> stage S-1 -> coordinator) where ``local`` hands Python objects
on. The floor to compare it with is a plain TCP ping-pong of a decode step's
activation size between two processes (:func:`tcp_pingpong`).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from noodle.errors import SpecError

__all__ = ["tcp_pingpong", "measure_distributed", "write_distributed", "MODES"]

MODES = ("local", "torchrpc", "grpc", "grpc-unary")


def _echo(port_file: str, nbytes: int) -> int:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    Path(port_file).write_text(str(srv.getsockname()[1]))
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(nbytes)
    view = memoryview(buf)
    while True:
        got = 0
        while got < nbytes:
            n = conn.recv_into(view[got:], nbytes - got)
            if n == 0:
                return 0
            got += n
        conn.sendall(buf)


def tcp_pingpong(nbytes: int = 3072, rounds: int = 2000) -> dict[str, float]:
    """Round trip of ``nbytes`` to an echo process and back over loopback TCP (microseconds)."""
    import tempfile

    from noodle.executors.spawner import spawn

    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        proc = spawn(_echo, str(port_file), nbytes)
        try:
            deadline = time.monotonic() + 120
            while not port_file.exists() or not port_file.read_text():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"echo process did not start: {proc.log_text()[-2000:]}")
                time.sleep(0.01)
            sock = socket.create_connection(("127.0.0.1", int(port_file.read_text())))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            msg, back = os.urandom(nbytes), bytearray(nbytes)
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                sock.sendall(msg)
                got = 0
                while got < nbytes:
                    got += sock.recv_into(memoryview(back)[got:], nbytes - got)
                times.append((time.perf_counter() - t0) * 1e6)
            sock.close()
        finally:
            proc.close()
    times.sort()
    return {"bytes": nbytes, "rounds": rounds, "rtt_us_p50": statistics.median(times),
            "rtt_us_p10": times[len(times) // 10], "rtt_us_p90": times[len(times) * 9 // 10]}  # fmt: skip


def _serve(config: Any, threads: int) -> int:
    from noodle.executors.grpc.server import run_forever

    torch.set_num_threads(threads)
    return run_forever(config)


def _grpc_workers(model_dir: Path, n: int, threads: int) -> tuple[list[Any], list[str]]:
    import re

    from noodle.executors.grpc.worker import WorkerConfig
    from noodle.executors.spawner import spawn

    procs = [spawn(_serve, WorkerConfig(model_dir=model_dir, port=0), threads) for _ in range(n)]
    addrs: list[str] = []
    deadline = time.monotonic() + 300
    for p in procs:
        while True:
            m = re.search(r"serving grpc on (\S+:\d+)", p.log_text())
            if m:
                addrs.append(m.group(1))
                break
            if p.poll() is not None or time.monotonic() > deadline:
                for q in procs:
                    q.close()
                raise RuntimeError(f"gRPC worker did not start: {p.log_text()[-2000:]}")
            time.sleep(0.05)
    return procs, addrs


def _steps(executor: Any, prompt: list[int], decode_tokens: int) -> tuple[list[float], Any]:
    stamps: list[float] = []
    res = executor.generate([prompt], max_new_tokens=decode_tokens, on_step=lambda _n: stamps.append(time.perf_counter()))
    return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])], res.report


def measure_distributed(
    model_dir: Path, *, stages: int = 3, rounds: int = 5, warmup: int = 1, prompt_tokens: int = 32,
    decode_tokens: int = 32, threads: int = 1, seed: int = 0, modes: tuple[str, ...] = MODES, log: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """Decode step times of every mode on one plan, interleaved; see the module docstring."""
    from noodle.executors.grpc.coordinator import GrpcExecutor
    from noodle.executors.local import LocalExecutor
    from noodle.executors.ring.coordinator import TorchRpcExecutor
    from noodle.executors.slicing import read_config, unit_names_of
    from noodle.plandoc import (
        NodeDoc,
        PlanDoc,
        Predicted,
        SolverInfo,
        StageDoc,
        even_cuts,
    )

    unknown = [m for m in modes if m not in MODES]
    if unknown or "local" not in modes:
        raise SpecError(f"--modes: {', '.join(unknown) or 'local missing'}; choose from {', '.join(MODES)} (local is the baseline)")
    units = unit_names_of(model_dir)
    cuts = even_cuts(len(units), stages)
    vocab = int(read_config(model_dir).vocab_size)
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    docs = [
        StageDoc(stage_id=i, node=f"n{i}", device="cpu", layers=units[a:b], start=a, end=b, compute_ms=0.0, hop_ms=0.0,
                 expected_latency_ms=0.0, memory_required_mb=0.0, memory_available_mb=0.0, rationale="benchmark")
        for i, (a, b) in enumerate(zip(cuts, cuts[1:]))
    ]  # fmt: skip
    plan = PlanDoc(
        name="bench", objective="latency", objective_ms=0.0, cost_model="none",
        solver=SolverInfo(name="even", status="baseline", solve_time_s=0.0),
        predicted=Predicted(token_latency_ms=0.0, bottleneck_ms=0.0, tokens_per_s=0.0), stages=docs, units=units,
        workload={"prompt_tokens": prompt_tokens, "max_new_tokens": decode_tokens, "batch_size": 1},
        nodes=[NodeDoc(id=s.node, device="cpu", memory_gb=1.0, compute_score=1.0) for s in docs],
    )  # fmt: skip
    say = log or (lambda _line: None)
    torch.set_num_threads(threads)
    floor = tcp_pingpong(nbytes=int(read_config(model_dir).hidden_size) * 4)
    say(f"TCP ping-pong {floor['bytes']} B: {floor['rtt_us_p50']:.0f} us")
    procs: list[Any] = []
    executors: dict[str, Any] = {}
    try:
        if any(m.startswith("grpc") for m in modes):
            procs, addrs = _grpc_workers(model_dir, stages, threads)
            workers = {d.node: a for d, a in zip(docs, addrs)}
        for mode in modes:
            say(f"loading {mode}")
            if mode == "local":
                ex: Any = LocalExecutor(plan, model_dir)
            elif mode == "torchrpc":
                ex = TorchRpcExecutor(plan, model_dir, threads=threads, log=say)
            else:
                ex = GrpcExecutor(plan, model_dir, workers=workers, stream=mode == "grpc", log=say)
            executors[mode] = ex.__enter__()
        steps: dict[str, list[float]] = {m: [] for m in modes}
        reports: dict[str, Any] = {}
        for r in range(warmup + rounds):
            order = list(modes[r % len(modes) :] + modes[: r % len(modes)])
            for mode in order:
                t, rep = _steps(executors[mode], prompt, decode_tokens)
                if r >= warmup:
                    steps[mode].extend(t)
                    reports[mode] = rep
            say(f"round {r + 1}/{warmup + rounds}{' (warm-up)' if r < warmup else ''}")
    finally:
        for ex in executors.values():
            ex.__exit__(None, None, None)
        for p in procs:
            p.close()
    base = statistics.median(steps["local"])
    hops = stages + 1
    out_modes: dict[str, Any] = {}
    for mode in modes:
        p50 = statistics.median(steps[mode])
        entry: dict[str, Any] = {
            "step_ms_p50": p50, "step_ms_mean": statistics.fmean(steps[mode]), "tokens_per_s": 1e3 / p50,
            "ratio_vs_local": base / p50, "added_ms_per_hop": (p50 - base) / hops if mode != "local" else 0.0,
            "steps": len(steps[mode]),
        }  # fmt: skip
        rep = reports[mode]
        entry["stage_compute_ms_p50"] = [st.decode_ms_p50 for st in rep.stages]  # each stage's own timer
        entry["forward_ms_p50"] = rep.decode_ms_p50  # one step through the stages, sampling excluded
        if hasattr(rep, "hops"):
            entry.update(
                network_ms_p50=rep.network_ms_p50, network_share=rep.network_share,
                network_ms_per_hop=rep.network_ms_p50 / hops, data_path=rep.data_path,
                hops=[{"name": h.name, "bytes_per_decode": h.bytes_per_decode, "transit_ms_p50": h.transit_ms_p50,
                       "serialize_ms_p50": h.serialize_ms_p50} for h in rep.hops],
            )  # fmt: skip
        out_modes[mode] = entry
    return {
        "benchmark": "distributed", "stages": stages, "cuts": cuts, "hops_per_step": hops, "rounds": rounds,
        "warmup": warmup, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "torch_threads": threads,
        "device": f"cpu ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, loopback",
        "load_average_1m": os.getloadavg()[0], "tcp_pingpong": floor, "modes": out_modes,
    }  # fmt: skip


def write_distributed(result: dict[str, Any], out: Path, stem: str = "distributed") -> dict[str, Path]:
    """Write ``<stem>.json``, ``.csv`` and ``.png`` under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{stem}.{ext}" for ext in ("json", "csv", "png")}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    cols = ("step_ms_p50", "tokens_per_s", "ratio_vs_local", "added_ms_per_hop", "network_ms_per_hop", "network_share")
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", *cols])
        for mode, e in result["modes"].items():
            w.writerow([mode, *(f"{e[c]:.4f}" if c in e else "" for c in cols)])
    names = list(result["modes"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    tps = [result["modes"][m]["tokens_per_s"] for m in names]
    bars = left.bar(names, tps, color=["#888888"] + ["#3b7dd8"] * (len(names) - 1))
    for bar, m in zip(bars, names):
        left.annotate(f"{result['modes'][m]['ratio_vs_local']:.0%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=9)  # fmt: skip
    left.axhline(0.8 * tps[0], color="#cc4444", ls="--", lw=1, label="80% of local")
    left.set_ylabel("decode tokens/s (batch 1)")
    left.set_title(f"{result.get('model', '')} in {result['stages']} stages, {result['rounds']} interleaved rounds")
    left.legend(fontsize=8)
    dist = names[1:]
    x = list(range(len(dist)))
    right.bar([i - 0.2 for i in x], [result["modes"][m]["added_ms_per_hop"] for m in dist], width=0.4,
              color="#3b7dd8", label="step time added vs local, per hop")  # fmt: skip
    right.bar([i + 0.2 for i in x], [result["modes"][m].get("network_ms_per_hop", 0.0) for m in dist], width=0.4,
              color="#7fb069", label="network: step - stage compute, per hop")  # fmt: skip
    right.set_xticks(x, dist)
    right.axhline(1.0, color="#cc4444", ls="--", lw=1, label="1 ms target")
    floor = result["tcp_pingpong"]
    right.axhline(floor["rtt_us_p50"] / 1e3, color="#444444", ls=":", lw=1,
                  label=f"TCP ping-pong {floor['bytes']} B ({floor['rtt_us_p50']:.0f} us)")  # fmt: skip
    right.set_ylabel(f"ms per hop ({result['hops_per_step']} hops per step)")
    right.set_title("per-hop overhead on loopback")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths
