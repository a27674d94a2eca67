"""The engine's checks on a CUDA machine, in one run of a few minutes (``bench/gpu_check.sh`` calls it).

Prints one line per check and writes ``$OUT/gpu_check.json`` (or ``--out``):

1. tokens equal to ``generate()`` with CUDA stages on ``local`` (plain, exact and continuous batching),
   ``grpc`` (two ``noodle worker --device cuda`` processes) and ``torchrpc`` (spawned ranks);
2. a GPU stage and a CPU stage in one plan (``local``, one process);
3. the ring's NCCL decision for two GPU stages on this machine's GPUs (Gloo when they share one);
4. ``noodle serve`` output tokens/s at 1 and 32 streams vs ``generate()`` at batch 1 and 32 on the same
   GPU, GPT-2 small with random weights (target: >= 0.5x at 32).

``--cpu`` runs the same checks with every "gpu" stage on the CPU: how CI-less machines test the script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from noodle.executors.generation import token_ids_of  # noqa: E402
from noodle.executors.slicing import read_config, unit_names_of  # noqa: E402
from noodle.models import init_model, load_model  # noqa: E402
from noodle.plandoc import NodeDoc, PlanDoc, Predicted, SolverInfo, StageDoc  # noqa: E402

PROMPTS = [[5, 17, 99, 42, 7, 300, 12], [77, 3, 250], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
results: dict[str, Any] = {}


def say(key: str, ok: bool | None, text: str, **data: Any) -> None:
    mark = {True: "PASS", False: "FAIL", None: "INFO"}[ok]
    print(f"[{mark}] {key}: {text}", flush=True)
    results[key] = {"ok": ok, "text": text, **data}


def plan(model: Path, cuts: list[int], devices: list[str], memory_gb: float = 64.0) -> PlanDoc:
    units = unit_names_of(model)
    stages = [StageDoc(stage_id=i, node=f"n{i}", device=d, layers=units[a:b], start=a, end=b, compute_ms=1.0, hop_ms=0.0,
                       expected_latency_ms=1.0, memory_required_mb=1.0, memory_available_mb=memory_gb * 1024,
                       rationale="gpu_check")  # fmt: skip
              for i, (a, b, d) in enumerate(zip(cuts, cuts[1:], devices))]
    nodes = [NodeDoc(id=s.node, device=s.device, memory_gb=memory_gb, compute_score=1.0) for s in stages]
    return PlanDoc(name="gpu-check", objective="latency", objective_ms=float(len(stages)), cost_model="none",
                   solver=SolverInfo(name="hand", status="baseline", solve_time_s=0.0),
                   predicted=Predicted(token_latency_ms=len(stages), bottleneck_ms=1.0, tokens_per_s=1e3 / len(stages)),
                   stages=stages, units=units, workload={"prompt_tokens": 64, "max_new_tokens": 64, "batch_size": 32},
                   nodes=nodes)  # fmt: skip


def reference(model: Path, device: str, new: int) -> list[list[int]]:
    """Greedy ``generate()`` of each prompt alone, on ``device``."""
    eos, pad = token_ids_of(read_config(model))
    lm = load_model(model).to(device)
    out = []
    for p in PROMPTS:
        with torch.inference_mode():
            seq = lm.generate(input_ids=torch.tensor([p], device=device), max_new_tokens=new, do_sample=False,
                              pad_token_id=pad, eos_token_id=eos)  # fmt: skip
        out.append(seq[0, len(p) :].tolist())
    return out


def check_local(model: Path, gpu: str, want: list[list[int]], new: int) -> None:
    from noodle.executors.local import LocalExecutor

    for name, devices in (("local, 3 gpu stages", [gpu, gpu, gpu]), ("local, gpu stage + cpu stage", [gpu, "cpu"])):
        cuts = [0, 2, 4, 6] if len(devices) == 3 else [0, 3, 6]
        with LocalExecutor(plan(model, cuts, devices), model) as ex:
            where = sorted({str(next(m.parameters()).device) for st in ex.stages for m in st.slice.modules()
                            if any(True for _ in m.parameters())})  # fmt: skip
            plain = [ex.generate([p], max_new_tokens=new).tokens[0] for p in PROMPTS]
            got = {"generate path": plain}
            for mode in ("exact", "continuous"):
                with ex.pipeline(concurrency=4, batching=mode) as pipe:
                    got[mode] = [h.result(timeout=300).tokens for h in [pipe.submit(p, max_new_tokens=new) for p in PROMPTS]]
        for how, tokens in got.items():
            say(f"{name} ({how})", tokens == _cut(want), f"stages on {where}", tokens=tokens)


def _cut(want: list[list[int]], eos: int = 2) -> list[list[int]]:
    return [w[: w.index(eos) + 1] if eos in w else w for w in want]


def check_torchrpc(model: Path, gpu: str, want: list[list[int]], new: int) -> None:
    from noodle.executors.devices import gpu_indices, ring_backend
    from noodle.executors.ring.coordinator import TorchRpcExecutor

    doc = plan(model, [0, 3, 6], [gpu, gpu])
    idx = gpu_indices([gpu, gpu], reserve_first=True)
    backend, reason = ring_backend("auto", idx, nccl_available=torch.distributed.is_nccl_available())
    n_gpus = torch.cuda.device_count()
    expected = "nccl" if n_gpus >= 3 else "gloo"
    say("torchrpc backend decision", backend == expected or gpu == "cpu", f"{n_gpus} GPU(s), 2 GPU stages: {reason}")
    with TorchRpcExecutor(doc, model, threads=2) as ex:
        got = [ex.generate([p], max_new_tokens=new).tokens[0] for p in PROMPTS]
    say("torchrpc, 2 gpu stages", got == _cut(want), f"data path {ex.backend}", tokens=got)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_grpc(model: Path, gpu: str, want: list[list[int]], new: int, tmp: Path) -> None:
    token = "gpu-check"
    ports = [_free_port(), _free_port()]
    env = {**os.environ, "NOODLE_TOKEN": token}
    device = "cuda" if gpu != "cpu" else "cpu"
    procs = [subprocess.Popen([sys.executable, "-m", "noodle.cli.main", "worker", "--model", str(model), "--port", str(p),
                               "--device", device, "--threads", "2"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for p in ports]  # fmt: skip
    try:
        for proc in procs:
            line = proc.stdout.readline().decode() if proc.stdout else ""  # type: ignore[union-attr]
            if "serving grpc" not in line:
                raise RuntimeError(f"worker did not start: {line!r}")
        doc = plan(model, [0, 3, 6], [gpu, gpu])
        path = tmp / "grpc-plan.json"
        path.write_text(json.dumps(doc.as_dict()))
        workers = ",".join(f"n{i}=127.0.0.1:{p}" for i, p in enumerate(ports))
        ids = tmp / "ids.txt"
        ids.write_text("\n".join(",".join(map(str, p)) for p in PROMPTS) + "\n")
        for mode in ("groups", "continuous"):
            out = subprocess.run([sys.executable, "-m", "noodle.cli.main", "exec", str(path), "--model", str(model),
                                  "--backend", "grpc", "--workers", workers, "--batch-ids", str(ids), "-n", str(new),
                                  "--concurrency", "3", "--batching", mode, "--format", "json"], env=env,
                                 capture_output=True, text=True, timeout=300)  # fmt: skip
            if out.returncode != 0:
                say(f"grpc ({mode})", False, out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed")
                continue
            got = json.loads(out.stdout)["tokens"]
            say(f"grpc, workers --device {device} ({mode})", got == _cut(want), "2 workers", tokens=got)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)


def check_throughput(gpu: str, tmp: Path, seconds: float) -> None:
    from bench.loadgen import run_level, summarize
    from bench.servebench import launch_serve

    model = init_model("gpt2", tmp / "gpt2", seed=0)
    n = len(unit_names_of(model))
    path = tmp / "gpt2-plan.json"
    path.write_text(json.dumps(plan(model, [0, n], [gpu]).as_dict()))
    gen = _generate_rate(model, "cuda" if gpu != "cpu" else "cpu", (1, 32), 64)
    rates: dict[int, float] = {}
    with launch_serve(["--model", str(model), "--plan", str(path), "--concurrency", "32", "--max-queue", "256",
                       "--batching", "continuous"]) as (base, _proc):  # fmt: skip
        run_level(base, model.name, 32, duration_s=2.0, max_tokens=8, prompts=["warm up"])
        for c in (1, 32):
            recs, wall = run_level(base, model.name, c, duration_s=seconds, max_tokens=64,
                                   prompts=["The planner measures", "Once upon a time", "In a distant land"])  # fmt: skip
            rates[c] = summarize(c, recs, wall).output_tokens_per_s
    for c in (1, 32):
        ratio = rates[c] / gen[c] if gen[c] else 0.0
        say(f"serve vs generate(), {c} stream(s)", (ratio >= 0.5) if c == 32 else None,
            f"noodle serve {rates[c]:.0f} tokens/s, generate() batch {c} {gen[c]:.0f} tokens/s: {ratio:.2f}x",
            serve=rates[c], generate=gen[c])  # fmt: skip


def _generate_rate(model: Path, device: str, batches: tuple[int, ...], new: int) -> dict[int, float]:
    lm = load_model(model).to(device)
    out = {}
    for b in batches:
        ids = torch.randint(3, 1000, (b, 16), device=device)
        with torch.inference_mode():
            lm.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            seq = lm.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        out[b] = b * (seq.shape[1] - 16) / (time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description="noodle's CUDA checks")
    ap.add_argument("--cpu", action="store_true", help="run the checks with every gpu stage on the CPU")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu_check")))
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds per serve throughput level")
    ap.add_argument("--skip", default="", help="comma-separated checks to skip: local,torchrpc,grpc,throughput")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not a.cpu:
        print("gpu_check: this machine has no CUDA device; run with --cpu to check the script on the CPU")
        return 2
    gpu = "cpu" if a.cpu else "gpu"
    import transformers

    say("environment", None, f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.cuda.get_device_name(0) if cuda else 'no CUDA'} x {torch.cuda.device_count()}")  # fmt: skip
    skip = set(a.skip.split(","))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="noodle-gpu-check-") as tmp:
        model = init_model("llama-tiny", Path(tmp) / "llama", seed=0, tokenizer=False)
        want = reference(model, "cuda" if gpu != "cpu" else "cpu", 8)
        # throughput first: after a torchrpc ring this process's generate() runs several times slower on a CPU
        for name, fn in (("throughput", lambda: check_throughput(gpu, Path(tmp), a.seconds)),
                         ("local", lambda: check_local(model, gpu, want, 8)),
                         ("grpc", lambda: check_grpc(model, gpu, want, 8, Path(tmp))),
                         ("torchrpc", lambda: check_torchrpc(model, gpu, want, 8))):  # fmt: skip
            if name in skip:
                continue
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
                text = re.sub(r"\s+", " ", str(exc))[:300]
                say(name, False, f"{type(exc).__name__}: {text}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_check.json").write_text(json.dumps({"seconds": time.perf_counter() - t0, "checks": results}, indent=2))
    failed = [k for k, v in results.items() if v["ok"] is False]
    print(f"gpu_check: {len(results) - len(failed)} of {len(results)} checks passed or informed, "
          f"{len(failed)} failed ({', '.join(failed) or 'none'}) in {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
