"""The plan ``noodle serve`` runs: a plan file, a spec solved at start-up, or this machine alone.

The embedded default (only ``--model``) measures this machine instead of trusting
hand-written numbers: its free memory from psutil, and its matmul throughput and
memory bandwidth with two short torch timings; those become the reference device
(``compute_score`` 1.0) of the analytic unit costs (:mod:`noodle.models.analytic`).
The workload is the model's context: 3/4 of its positions for the prompt, the rest
for new tokens, ``concurrency`` sequences at once: under continuous batching (``--batching``
``auto`` or ``continuous``, the serving default) as ``workload.streams``, so the plan is priced
at the batch each stage steps and predicts the batched pipeline's tokens/s
(:mod:`noodle.graph.costmodel`); under ``groups`` and ``exact`` on the older terms
(``batch_size = concurrency``).
"""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path
from typing import Any

from noodle.errors import SpecError
from noodle.models.analytic import ReferenceDevice
from noodle.plandoc import PlanDoc, load_plan, plan_document
from noodle.solvers import solve
from noodle.spec import load_spec, parse_spec

__all__ = ["measure_reference", "embedded_spec", "plan_this_machine", "plan_from_spec", "resolve_plan",
           "plans_streams"]


def plans_streams(batching: str) -> bool:
    """Whether a server whose engine runs ``batching`` is planned for continuous batching (``workload.streams``).

    ``auto`` batches continuously wherever the stages take packed steps (every backend's stages do);
    ``exact`` runs each sequence alone inside a step and ``groups`` steps fixed groups: both keep the
    groups terms.
    """
    return batching in ("auto", "continuous")


def measure_reference(seconds: float = 0.15, device: str = "cpu") -> ReferenceDevice:
    """``device``'s float32 matmul throughput (TFLOP/s) and memory bandwidth (GB/s), measured."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    big = device != "cpu"
    n = 4096 if big else 512
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        reps += 1
        sync()
    tflops = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
    src = torch.empty((256 if big else 16) * 2**20 // 4, device=device)  # float32, larger than a GPU's caches
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        dst.copy_(src)
        reps += 1
        sync()
    gbps = 2 * src.numel() * 4 * reps / (time.perf_counter() - t0) / 1e9  # read + write
    return ReferenceDevice(tflops=max(tflops, 1e-4), mem_bandwidth_gbps=max(gbps, 1e-3))


def _node_id() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", platform.node()) or "this-machine"


def embedded_spec(model_dir: Path, config: Any, *, concurrency: int, reference: ReferenceDevice,
                  memory_bytes: int, device: str = "cpu", gpu: tuple[int, float] | None = None,
                  batching: str = "auto") -> dict[str, Any]:  # fmt: skip
    """The spec of this machine alone serving ``model_dir`` (as a mapping for :func:`noodle.spec.parse_spec`).

    ``concurrency`` sequences in flight: ``workload.streams`` when ``batching`` is continuous
    (:func:`plans_streams`), else one group of ``batch_size = concurrency``.

    ``gpu``: ``(free bytes, speed relative to the CPU)`` of a CUDA device: it becomes a node of its own
    beside the CPU, linked over PCIe, so a model that fits runs on the GPU and one that does not spills
    its last units to the CPU.
    """
    from noodle.executors.kvbudget import max_positions

    positions = max_positions(config) or 2048
    prompt = max(1, positions * 3 // 4)
    return {
        "name": f"serve-{model_dir.name}",
        "model": {
            "hf_config": str((model_dir / "config.json").resolve()),
            "reference": {"tflops": reference.tflops, "mem_bandwidth_gbps": reference.mem_bandwidth_gbps},
        },
        "workload": {"prompt_tokens": prompt, "max_new_tokens": max(1, positions - prompt),
                     ("streams" if plans_streams(batching) else "batch_size"): concurrency},
        "cluster": _cluster(device, memory_bytes, gpu),
        "objective": "throughput",
        "solver": {"name": "auto", "time_limit_s": 5.0},
    }


def _cluster(device: str, memory_bytes: int, gpu: tuple[int, float] | None) -> dict[str, Any]:
    cpu = {"id": _node_id(), "device": device, "memory_gb": memory_bytes / 2**30, "compute_score": 1.0}
    if gpu is None:
        return {"nodes": [cpu]}
    free, score = gpu
    gpu_node = {"id": f"{_node_id()}-gpu", "device": "gpu", "memory_gb": free / 2**30, "compute_score": score}
    return {"nodes": [gpu_node, cpu], "links": {"default": {"bandwidth_gbps": 100.0, "latency_ms": 0.02}}}  # PCIe


def plan_this_machine(model_dir: Path, *, concurrency: int, batching: str = "auto") -> tuple[PlanDoc, dict[str, Any]]:
    """Solve the plan of this machine (its CPU, and its first GPU as a second node); returns it and what was measured.

    GPU stages run in bfloat16 where the GPU supports it (the plan's stage says so), the CPU's in float32.
    """
    import psutil
    import torch

    from noodle.executors.slicing import read_config

    config = read_config(model_dir)
    ref = measure_reference()
    memory = int(psutil.virtual_memory().available)
    gpu: tuple[int, float] | None = None
    measured: dict[str, Any] = {"tflops": ref.tflops, "mem_bandwidth_gbps": ref.mem_bandwidth_gbps, "memory_gb": memory / 2**30}
    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(0)
        gref = measure_reference(device="cuda:0")
        score = gref.mem_bandwidth_gbps / ref.mem_bandwidth_gbps  # decode reads every weight once a step
        gpu = (int(free * 0.9), max(score, 1e-3))  # 10 % left for the allocator and activations
        measured["gpu"] = {"tflops": gref.tflops, "mem_bandwidth_gbps": gref.mem_bandwidth_gbps, "free_gb": free / 2**30,
                           "compute_score": score}  # fmt: skip
    data = embedded_spec(model_dir, config, concurrency=concurrency, reference=ref, memory_bytes=memory, gpu=gpu,
                         batching=batching)  # fmt: skip
    spec = parse_spec(data, source="noodle serve (this machine)")
    problem = spec.to_problem(model_dir, source="noodle serve (this machine)")
    result = solve(problem, solver=spec.solver.name, time_limit_s=spec.solver.time_limit_s)
    doc = plan_document(problem, result)
    if gpu is not None and torch.cuda.is_bf16_supported(including_emulation=False):  # native bf16 (Ampere on)
        doc = _bfloat16_on_gpus(doc)
    return doc, measured


def _bfloat16_on_gpus(doc: PlanDoc) -> PlanDoc:
    """GPU stages in bfloat16 (half the memory the float32 plan reserved for their weights)."""
    stages = [st.model_copy(update={"format": "bfloat16", "rationale": f"{st.rationale}; bfloat16 on the GPU "
                                    "(the plan reserved float32 memory)"}) if st.device == "gpu" else st
              for st in doc.stages]  # fmt: skip
    return doc.model_copy(update={"stages": stages})


def plan_from_spec(spec_path: Path) -> PlanDoc:
    """Solve a spec file at start-up (as ``noodle solve`` does)."""
    spec, problem = load_spec(spec_path)
    result = solve(problem, solver=spec.solver.name, time_limit_s=spec.solver.time_limit_s)
    return plan_document(problem, result)


def resolve_plan(model_dir: Path, *, plan: Path | None, spec: Path | None, concurrency: int,
                 batching: str = "auto") -> tuple[PlanDoc, str]:  # fmt: skip
    """The plan to serve and where it came from (``plan`` | ``spec`` | ``this machine``, planned for ``batching``)."""
    if plan is not None and spec is not None:
        raise SpecError("serve: give --plan or --spec, not both")
    if plan is not None:
        return load_plan(plan), f"plan {plan}"
    if spec is not None:
        return plan_from_spec(spec), f"spec {spec}"
    doc, m = plan_this_machine(model_dir, concurrency=concurrency, batching=batching)
    gpu = m.get("gpu")
    also = (f"; its GPU {gpu['tflops']:.1f} TFLOP/s, {gpu['mem_bandwidth_gbps']:.0f} GB/s, {gpu['free_gb']:.1f} GiB free"
            if gpu else "")  # fmt: skip
    p = doc.predicted
    how = (f"; {p.streams} streams in batches of {p.step_batch}: {p.pipeline_tokens_per_s:.1f} tokens/s predicted"
           if p.streams is not None and p.pipeline_tokens_per_s is not None else "")  # fmt: skip
    return doc, (f"this machine alone (measured {m['tflops'] * 1e3:.0f} GFLOP/s, {m['mem_bandwidth_gbps']:.1f} GB/s, "
                 f"{m['memory_gb']:.1f} GiB free{also}){how}")  # fmt: skip
