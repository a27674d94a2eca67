"""Hook overhead: instrumented vs uninstrumented forwards, interleaved step by step.

Every mode (``none``, ``specialized``, ``generic``) decodes its own copy of the
same request. A round runs the prefill of each mode back to back, then decode
step 1 of each mode, then step 2, and so on, in an order that rotates every
round; the hooks of a mode are installed just before its forward and removed
after it. Forwards compared with each other are therefore tens of milliseconds
apart, so the load of a shared CPU hits them alike. Each forward is timed with
``perf_counter`` around ``model(...)`` *and* the hooks' bookkeeping after it.

Overhead of a mode = median over paired samples of ``t_mode / t_none - 1``
(decode: one pair per round and step; prefill: one per round); also reported:
the ratio of the medians, the ratio of the 25th percentiles (the forwards least
disturbed by other processes), the interquartile range of the paired ratios and
the median paired difference in ms, and an estimate from first principles:
hook pairs per forward x the measured cost of one hooked call
(:func:`hook_call_cost_us`) / the uninstrumented forward time.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

from noodle.profile.engine import ObservabilityEngine, ProfileConfig, progress_bar
from noodle.profile.hooks import Clock, NullHooks, TimingHooks, timed_modules
from noodle.profile.metrics import percentile
from noodle.profile.system import device_description, system_info

__all__ = ["MODES", "hook_call_cost_us", "measure_overhead", "write_overhead"]

MODES: tuple[str, ...] = ("none", "specialized", "generic")
_PHASES = ("decode", "prefill")


def hook_call_cost_us(calls: int = 10_000, repeats: int = 3) -> float:
    """Microseconds one module call gains from a unit pre/post hook pair (best of ``repeats``).

    Measured on an ``nn.Identity`` with the very closures :class:`TimingHooks` installs, so
    it includes torch's slower dispatch path for hooked modules.
    """
    import torch
    from torch import nn

    ident, x = nn.Identity(), torch.zeros(1)

    def per_call() -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                ident(x)
            best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        return best

    plain = per_call()
    hooks = TimingHooks(ident, None, "specialized", Clock())  # type: ignore[arg-type]  # no layout: hooked by hand
    handles = [ident.register_forward_pre_hook(hooks._unit_pre("u")), ident.register_forward_hook(hooks._unit_post("u"))]
    try:
        hooks.start_forward()
        hooked = per_call()
    finally:
        for h in handles:
            h.remove()
    return max(hooked - plain, 0.0)


def measure_overhead(
    model: Any,
    *,
    model_name: str,
    rounds: int = 30,
    warmup: int = 2,
    prompt_tokens: int = 32,
    decode_tokens: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Interleaved overhead of each hook strategy relative to no hooks (see module doc)."""
    import torch

    cfg = ProfileConfig(model_name=model_name, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, seed=seed)
    engine = ObservabilityEngine(model, ".", cfg)  # only runs forwards: writes nothing
    inputs = engine.make_inputs()
    hooks: dict[str, Any] = {"none": NullHooks()}
    for mode in MODES[1:]:
        hooks[mode] = TimingHooks(engine.model, engine.layout, mode, engine.clock)
    times: dict[str, dict[str, list[float]]] = {m: {p: [] for p in _PHASES} for m in MODES}

    def forward(mode: str, ids: Any, cache: Any) -> tuple[Any, Any, float]:
        h = hooks[mode]
        if isinstance(h, TimingHooks):
            h.install()
        t0 = time.perf_counter()
        ids, cache, _, _ = engine.step(ids, cache, h)
        ms = (time.perf_counter() - t0) * 1e3
        if isinstance(h, TimingHooks):
            h.remove()
        return ids, cache, ms

    def one_round(r: int, record: bool) -> None:
        order = MODES[r % len(MODES):] + MODES[: r % len(MODES)]
        state = {m: (inputs.input_ids, None) for m in MODES}
        for i in range(decode_tokens + 1):
            for mode in order:
                ids, cache, ms = forward(mode, *state[mode])
                state[mode] = (ids, cache)
                if record:
                    times[mode]["prefill" if i == 0 else "decode"].append(ms)

    for r in range(warmup):
        one_round(r, False)
    with progress_bar(progress, f"{model_name}: overhead rounds", rounds) as advance:
        for r in range(rounds):
            one_round(r, True)
            advance()
    result: dict[str, Any] = {
        "model": model_name,
        "device": device_description(system_info(engine.device)),
        "method": "modes interleaved forward by forward (order rotates per round); "
                  "overhead = median of paired t_mode / t_none - 1",
        "rounds": rounds,
        "warmup_rounds": warmup,
        "torch_threads": torch.get_num_threads(),
        "workload": {"prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "batch_size": 1},
        "modes": {},
    }
    cost = hook_call_cost_us()
    roots = sum(len(paths) for paths in engine.layout.unit_modules().values())
    hooked = {"none": 0, "specialized": roots, "generic": roots + len(timed_modules(engine.model))}
    result["hook_call_cost_us"] = round(cost, 3)
    for mode in MODES:
        entry: dict[str, Any] = {"hook_pairs": hooked[mode]}
        for phase in _PHASES:
            values, base = times[mode][phase], times["none"][phase]
            entry[f"{phase}_ms_p50"] = round(percentile(values, 50), 4)
            if mode == "none":
                continue
            ratios = [a / b - 1.0 for a, b in zip(values, base, strict=True)]
            entry[f"{phase}_overhead_pct"] = round(100 * percentile(ratios, 50), 3)
            entry[f"{phase}_overhead_pct_iqr"] = [round(100 * percentile(ratios, q), 3) for q in (25, 75)]
            entry[f"{phase}_overhead_pct_of_medians"] = round(100 * (percentile(values, 50) / percentile(base, 50) - 1), 3)
            entry[f"{phase}_overhead_pct_of_p25"] = round(100 * (percentile(values, 25) / percentile(base, 25) - 1), 3)
            entry[f"{phase}_overhead_ms"] = round(percentile([a - b for a, b in zip(values, base, strict=True)], 50), 4)
            entry[f"{phase}_pairs"] = len(ratios)
            # what the hooks alone should cost: hook pairs called x measured cost of one hooked call
            entry[f"{phase}_estimated_pct"] = round(100 * hooked[mode] * cost / 1e3 / percentile(base, 50), 3)
        result["modes"][mode] = entry
    return result


def write_overhead(result: dict[str, Any], folder: str | Path, stem: str = "profile_overhead") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.csv`` and ``<stem>.png`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{stem}.json", "csv": folder / f"{stem}.csv", "png": folder / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    cols = ["mode"] + [f"{p}_{k}" for p in _PHASES for k in
                       ("ms_p50", "overhead_pct", "overhead_pct_of_medians", "overhead_pct_of_p25", "overhead_ms", "pairs",
                        "estimated_pct")]
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
    width = 0.35
    for i, key in enumerate(_PHASES):
        vals = [result["modes"][m][f"{key}_overhead_pct"] for m in modes]
        lo = [v - result["modes"][m][f"{key}_overhead_pct_iqr"][0] for v, m in zip(vals, modes, strict=True)]
        hi = [result["modes"][m][f"{key}_overhead_pct_iqr"][1] - v for v, m in zip(vals, modes, strict=True)]
        xs = [j + (i - 0.5) * width for j in range(len(modes))]
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=3, label=key)
    ax.axhline(5.0, color="red", linestyle="--", linewidth=1, label="5% goal")
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("overhead vs no hooks (%)")
    ax.set_title(f"Hook overhead, {result['model']} ({result['rounds']} interleaved rounds; whiskers: IQR of pairs)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    plt.close(fig)
    return paths
