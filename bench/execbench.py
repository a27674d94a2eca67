"""Staged-execution overhead: the unsplit model's decode loop vs the local executor.

One process, one model folder, every mode loaded at once; rounds are interleaved
(each round runs every mode once, in a rotating order) so that the noise of a
shared CPU falls on all modes alike. A step's time is the interval between two
consecutive tokens coming out of greedy decoding, sampling included, in both the
native loop (``model(input_ids, cache=DynamicCache)`` + argmax) and the executor
(``on_step`` timestamps).
"""

from __future__ import annotations

import csv
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from noodle.errors import SpecError
from noodle.plandoc import even_cuts

__all__ = ["measure_exec_overhead", "write_exec_overhead", "run_exec_bench"]


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _deltas(stamps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]


def _native_steps(model: Any, ids: torch.Tensor, decode_tokens: int) -> list[tuple[float, float]]:
    from transformers import DynamicCache

    stamps: list[tuple[float, float]] = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        stamps.append(_stamp())
        for _ in range(decode_tokens - 1):
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            stamps.append(_stamp())
    return _deltas(stamps)


def _staged_steps(executor: Any, prompt: list[int], decode_tokens: int) -> list[tuple[float, float]]:
    stamps: list[tuple[float, float]] = []
    executor.generate([prompt], max_new_tokens=decode_tokens, on_step=lambda _n: stamps.append(_stamp()))
    return _deltas(stamps)


def measure_exec_overhead(
    model_dir: Path,
    *,
    max_stages: int = 4,
    rounds: int = 5,
    warmup: int = 1,
    prompt_tokens: int = 32,
    decode_tokens: int = 32,
    seed: int = 0,
    log: Any = None,
) -> dict[str, Any]:
    """Per-step decode times (ms) of the native loop and of 1..``max_stages`` stages; see module doc."""
    from noodle.executors.local import LocalExecutor
    from noodle.executors.slicing import read_config, unit_names_of
    from noodle.models import load_model
    from noodle.plandoc import NodeDoc, PlanDoc, Predicted, SolverInfo, StageDoc

    units = unit_names_of(model_dir)
    vocab = int(read_config(model_dir).vocab_size)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=gen).tolist()
    native = load_model(model_dir)

    def plan(cuts: list[int]) -> PlanDoc:
        stages = [
            StageDoc(stage_id=i, node=f"n{i}", device="cpu", layers=units[a:b], start=a, end=b, compute_ms=0.0,
                     hop_ms=0.0, expected_latency_ms=0.0, memory_required_mb=0.0, memory_available_mb=0.0,
                     rationale="benchmark")
            for i, (a, b) in enumerate(zip(cuts, cuts[1:]))
        ]  # fmt: skip
        return PlanDoc(
            name="bench", objective="latency", objective_ms=0.0, cost_model="none",
            solver=SolverInfo(name="even", status="baseline", solve_time_s=0.0),
            predicted=Predicted(token_latency_ms=0.0, bottleneck_ms=0.0, tokens_per_s=0.0), stages=stages,
            units=units, workload={"prompt_tokens": prompt_tokens, "max_new_tokens": decode_tokens, "batch_size": 1},
            nodes=[NodeDoc(id=s.node, device="cpu", memory_gb=1.0, compute_score=1.0) for s in stages],
        )  # fmt: skip

    executors: dict[str, Any] = {}
    cuts_of: dict[str, list[int]] = {}
    for k in range(1, max_stages + 1):
        cuts_of[f"{k} stage{'s' if k > 1 else ''}"] = even_cuts(len(units), k)
    for name, cuts in cuts_of.items():
        executors[name] = LocalExecutor(plan(cuts), model_dir).__enter__()
    ids = torch.tensor([prompt])
    modes = ["native", *executors]
    steps: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    round_p50: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for r in range(warmup + rounds):
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            for mode in order:
                t = (
                    _native_steps(native, ids, decode_tokens)
                    if mode == "native"
                    else _staged_steps(executors[mode], prompt, decode_tokens)
                )
                if r >= warmup:
                    steps[mode].extend(wall * 1e3 for wall, _ in t)
                    cpu[mode].extend(c * 1e3 for _, c in t)
                    round_p50[mode].append(statistics.median(wall for wall, _ in t) * 1e3)
            if log is not None:
                log(f"round {r + 1}/{warmup + rounds}{' (warm-up)' if r < warmup else ''}")
    finally:
        for ex in executors.values():
            ex.__exit__(None, None, None)

    base = statistics.median(steps["native"])
    base_cpu = statistics.median(cpu["native"])
    result_modes: dict[str, Any] = {}
    for mode in modes:
        p50 = statistics.median(steps[mode])
        cpu_p50 = statistics.median(cpu[mode])
        result_modes[mode] = {
            "stages": 0 if mode == "native" else len(cuts_of[mode]) - 1,
            "cuts": cuts_of.get(mode),
            "step_ms_p50": p50,
            "step_ms_mean": statistics.fmean(steps[mode]),
            "tokens_per_s": 1e3 / p50,
            "overhead_pct": (p50 / base - 1.0) * 100.0,
            # median over rounds of this round's p50 / the native p50 of the same round
            "overhead_pct_paired": (
                statistics.median(a / b for a, b in zip(round_p50[mode], round_p50["native"])) - 1.0
            ) * 100.0,
            "cpu_ms_p50": cpu_p50,
            "overhead_pct_cpu": (cpu_p50 / base_cpu - 1.0) * 100.0,
            "steps": len(steps[mode]),
        }
    return {
        "benchmark": "exec_overhead",
        "torch_threads": torch.get_num_threads(),
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "rounds": rounds,
        "warmup": warmup,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "modes": result_modes,
    }


def write_exec_overhead(result: dict[str, Any], out: Path, stem: str = "exec_overhead") -> dict[str, Path]:
    """Write ``<stem>.json``, ``.csv`` and ``.png`` under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{stem}.{ext}" for ext in ("json", "csv", "png")}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "stages", "step_ms_p50", "tokens_per_s", "overhead_pct", "overhead_pct_paired",
                    "cpu_ms_p50", "overhead_pct_cpu"])  # fmt: skip
        for mode, e in result["modes"].items():
            w.writerow([mode, e["stages"], f"{e['step_ms_p50']:.4f}", f"{e['tokens_per_s']:.3f}",
                        f"{e['overhead_pct']:.3f}", f"{e['overhead_pct_paired']:.3f}", f"{e['cpu_ms_p50']:.4f}",
                        f"{e['overhead_pct_cpu']:.3f}"])  # fmt: skip
    names = list(result["modes"])
    tps = [result["modes"][m]["tokens_per_s"] for m in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, tps, color=["#888888"] + ["#3b7dd8"] * (len(names) - 1))
    for bar, m in zip(bars, names):
        e = result["modes"][m]
        label = "baseline" if m == "native" else f"CPU {e['overhead_pct_cpu']:+.1f}%\nwall {e['overhead_pct']:+.1f}%"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(tps) * 1.25)
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(f"staged execution overhead ({result['rounds']} interleaved rounds, {result['torch_threads']} thread{'' if result['torch_threads'] == 1 else 's'})")
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


def run_exec_bench(
    preset: str = "gpt2", max_stages: int = 4, rounds: int = 10, warmup: int = 1, prompt_tokens: int = 32,
    decode_tokens: int = 32, threads: int = 1, out: Path = Path("bench/results"), seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Build ``preset`` with random weights, measure, print a table, write JSON/CSV/PNG to ``out``."""
    from rich.console import Console
    from rich.table import Table

    from noodle.models import init_model

    for flag, value, least in (("--max-stages", max_stages, 1), ("--rounds", rounds, 1), ("--warmup", warmup, 0),
                               ("--prompt-tokens", prompt_tokens, 1), ("--decode-tokens", decode_tokens, 3),
                               ("--threads", threads, 0)):  # fmt: skip
        if value < least:
            raise SpecError(f"{flag}: must be at least {least}, got {value}")
    if threads:
        torch.set_num_threads(threads)
    err = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="noodle-bench-") as tmp:
        with err.status(f"building {preset} with random weights"):
            model_dir = init_model(preset, Path(tmp) / preset, seed=seed)
        result = measure_exec_overhead(
            model_dir, max_stages=max_stages, rounds=rounds, warmup=warmup, prompt_tokens=prompt_tokens,
            decode_tokens=decode_tokens, seed=seed, log=lambda line: err.print(line, style="dim"),
        )  # fmt: skip
    result["model"] = preset
    paths = write_exec_overhead(result, out)
    table = Table(title=f"staged execution overhead, {preset}, decode batch 1 ({rounds} interleaved rounds)")
    for col in ("mode", "cuts", "step p50 ms", "tokens/s", "overhead", "paired", "cpu p50 ms", "cpu overhead"):
        table.add_column(col, justify="left" if col in ("mode", "cuts") else "right")
    for mode, e in result["modes"].items():
        table.add_row(mode, "-" if e["cuts"] is None else str(e["cuts"]), f"{e['step_ms_p50']:.2f}",
                      f"{e['tokens_per_s']:.1f}", "-" if mode == "native" else f"{e['overhead_pct']:+.2f}%",
                      "-" if mode == "native" else f"{e['overhead_pct_paired']:+.2f}%", f"{e['cpu_ms_p50']:.2f}",
                      "-" if mode == "native" else f"{e['overhead_pct_cpu']:+.2f}%")  # fmt: skip
    console = Console()
    console.print(table)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return result
