"""Hook overhead: instrumented vs uninstrumented runs, interleaved in one process.

Each round runs one iteration (prefill + decode steps) per mode (``none``,
``specialized``, ``generic``), in an order that rotates every round, so slow
drifts of a shared CPU hit every mode alike. Per round and mode we take the
mean decode-forward time, the prefill-forward time and the whole iteration
(which includes the hooks' bookkeeping after each forward); the overhead of a
mode is the median over rounds of its ratio to ``none`` in the same round, minus one.
"""

from __future__ import annotations

import csv
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from noodle.profile.engine import ObservabilityEngine, ProfileConfig, progress_bar
from noodle.profile.hooks import NullHooks, TimingHooks
from noodle.profile.metrics import percentile
from noodle.profile.system import device_description, system_info

__all__ = ["MODES", "measure_overhead", "write_overhead"]

MODES: tuple[str, ...] = ("none", "specialized", "generic")
_METRICS = ("decode_ms", "prefill_ms", "iteration_ms")


def measure_overhead(
    model: Any,
    *,
    model_name: str,
    rounds: int = 30,
    warmup: int = 3,
    prompt_tokens: int = 64,
    decode_tokens: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Interleaved overhead of each hook strategy relative to no hooks (see module doc)."""
    cfg = ProfileConfig(model_name=model_name, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, seed=seed)
    engine = ObservabilityEngine(model, ".", cfg)  # only runs iterations: writes nothing
    inputs = engine.make_inputs()
    hooks: dict[str, Any] = {"none": NullHooks()}
    for mode in MODES[1:]:
        hooks[mode] = TimingHooks(engine.model, engine.layout, mode, engine.clock)
    per_round: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in MODES}

    def one(mode: str, record: bool) -> None:
        h = hooks[mode]
        if isinstance(h, TimingHooks):
            h.install()
        phases: dict[str, list[float]] = defaultdict(list)
        t0 = time.perf_counter()
        engine.run_iteration(inputs, h, lambda phase, step, ms, *_: phases[phase].append(ms))
        total = (time.perf_counter() - t0) * 1e3
        if isinstance(h, TimingHooks):
            h.remove()
        if record:
            per_round[mode]["decode_ms"].append(sum(phases["decode"]) / len(phases["decode"]))
            per_round[mode]["prefill_ms"].append(phases["prefill"][0])
            per_round[mode]["iteration_ms"].append(total)

    for _ in range(warmup):
        for mode in MODES:
            one(mode, False)
    with progress_bar(progress, f"{model_name}: overhead rounds", rounds) as advance:
        for r in range(rounds):
            order = MODES[r % len(MODES):] + MODES[: r % len(MODES)]
            for mode in order:
                one(mode, True)
            advance()
    result: dict[str, Any] = {
        "model": model_name,
        "device": device_description(system_info(engine.device)),
        "method": "interleaved rounds (mode order rotates); overhead = median over rounds of mode/none - 1",
        "rounds": rounds,
        "warmup_rounds": warmup,
        "workload": {"prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "batch_size": 1},
        "modes": {},
    }
    base = per_round["none"]
    for mode in MODES:
        entry: dict[str, Any] = {}
        for metric in _METRICS:
            values = per_round[mode][metric]
            entry[f"{metric}_p50"] = round(percentile(values, 50), 4)
            if mode != "none":
                ratios = [a / b - 1.0 for a, b in zip(values, base[metric], strict=True)]
                key = metric.replace("_ms", "")
                entry[f"{key}_overhead_pct"] = round(100 * percentile(ratios, 50), 3)
                entry[f"{key}_overhead_pct_iqr"] = [
                    round(100 * percentile(ratios, 25), 3),
                    round(100 * percentile(ratios, 75), 3),
                ]
        result["modes"][mode] = entry
    return result


def write_overhead(result: dict[str, Any], folder: str | Path, stem: str = "profile_overhead") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.csv`` and ``<stem>.png`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{stem}.json", "csv": folder / f"{stem}.csv", "png": folder / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    cols = ["mode", *(f"{m}_p50" for m in _METRICS), "decode_overhead_pct", "prefill_overhead_pct",
            "iteration_overhead_pct"]
    with paths["csv"].open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        for mode, entry in result["modes"].items():
            writer.writerow([mode, *(entry.get(c, "") for c in cols[1:])])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in result["modes"] if m != "none"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.25
    for i, key in enumerate(("decode", "prefill", "iteration")):
        vals = [result["modes"][m][f"{key}_overhead_pct"] for m in modes]
        lo = [v - result["modes"][m][f"{key}_overhead_pct_iqr"][0] for v, m in zip(vals, modes, strict=True)]
        hi = [result["modes"][m][f"{key}_overhead_pct_iqr"][1] - v for v, m in zip(vals, modes, strict=True)]
        xs = [j + (i - 1) * width for j in range(len(modes))]
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=3, label=key)
    ax.axhline(5.0, color="red", linestyle="--", linewidth=1, label="5% goal")
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("overhead vs no hooks (%)")
    ax.set_title(f"Hook overhead, {result['model']} ({result['rounds']} interleaved rounds; whiskers: IQR)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    plt.close(fig)
    return paths
