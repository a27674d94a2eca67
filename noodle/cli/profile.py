"""``noodle profile``: time each placement unit of a model and write the profile folder."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from noodle.cli.checks import MAX_SEED, check_int, check_threads
from noodle.cli.output import stdout_console
from noodle.errors import SpecError
from noodle.extras import require_exec

__all__ = ["register", "open_model", "quiet_transformers"]

_MB = 1024.0**2
_log = logging.getLogger(__name__)


def quiet_transformers() -> None:
    """Keep transformers' warnings and progress bars off the CLI's output (errors still show)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def open_model(model: Path | None, config: Path | None, preset: str | None, seed: int) -> tuple[Any, str, str]:
    """(model, name, source) from exactly one of a model folder, a config file or a preset.

    Raises:
        SpecError: not exactly one source was given.
        ModelError: the folder, config or preset cannot be used.
    """
    from noodle.models import build_model, load_config, load_model

    given = [x for x in (model, config, preset) if x is not None]
    if len(given) != 1:
        raise SpecError("profile: give exactly one of --model PATH, --config FILE.json or --preset NAME")
    if model is not None:
        from noodle.models.resolve import resolve_model

        folder = resolve_model(model)
        return load_model(folder), model.name, str(folder)
    if config is not None:
        if not config.is_file():
            raise SpecError(f"--config: {config}: no such file")
        return build_model(load_config(config), seed=seed), config.stem, str(config)
    return build_model(load_config(str(preset)), seed=seed), str(preset), f"preset:{preset}"


def _render(report: Any, out: Path, console: Console) -> None:
    s = report.summary
    table = Table(title=f"profile of {s['model']} on {s['reference_device']['description']}")
    for col in ("unit", "type", "decode p50 ms", "decode p95 ms", "prefill ms/tok", "params MiB", "KV B/tok"):
        text = col in ("unit", "type")
        table.add_column(col, justify="left" if text else "right", no_wrap=text)
    prefill = {r["name"]: r for r in report.rows_of("unit", "prefill")}
    prompt = s["workload"]["prompt_tokens"]
    for r in report.rows_of("unit", "decode"):
        p = prefill[r["name"]]
        table.add_row(
            r["name"], r["module_type"], f"{r['latency_ms_p50']:.3f}", f"{r['latency_ms_p95']:.3f}",
            f"{p['latency_ms_p50'] / prompt:.4f}", f"{r['param_bytes'] / _MB:.1f}", str(r["kv_bytes_per_token"]),
        )
    console.print(table)
    tops = ", ".join(f"{b['name']} {b['latency_ms']:.3f} ms ({100 * b['share']:.1f}%)" for b in s["bottlenecks"])
    cov = s["coverage"]
    console.print(f"top-3 decode bottlenecks: {tops}")
    console.print(
        f"coverage: units {cov['units']['measured']}/{cov['units']['total']} ({cov['units']['percent']}%), "
        f"leaf modules {cov['leaf_modules']['timed']}/{cov['leaf_modules']['total']} ({cov['leaf_modules']['percent']}%)"
    )
    console.print(f"memory: {s['memory_source']}", style="dim")
    console.print(f"wrote {out}/ (metrics.jsonl, summary.json, units.json, system_info.json, profile_config.json"
                  + (", dashboard.html, summary.png)" if (out / "dashboard.html").exists() else ")"))


def _output_folder(out: Path) -> Path:
    """``--out`` as a folder that exists and takes files; checked before any model is built."""
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out: {out} is an existing file; give a folder for the profile (metrics.jsonl, units.json, ...)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".noodle-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SpecError(f"--out: cannot write to {out} ({exc.strerror or exc}); give a writable folder") from None
    return out


def profile_cmd(
    model: Path | None = typer.Option(None, "--model", "-m", help="local model folder, HF cache snapshot or cached repo id"),
    config: Path | None = typer.Option(None, "--config", help="config.json: build with seeded random weights"),
    preset: str | None = typer.Option(None, "--preset", help="preset: gpt2, gpt2-tiny, llama-small, llama-tiny"),
    out: Path | None = typer.Option(None, "--out", "-o", help="output folder (default runs/profile/<model>)"),
    seed: int = typer.Option(0, "--seed", help="seed of random weights and prompt"),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="prompt length of the prefill"),
    decode_tokens: int = typer.Option(16, "--decode-tokens", help="decode steps per iteration"),
    batch_size: int = typer.Option(1, "--batch-size", help="sequences per forward"),
    warmup: int | None = typer.Option(None, "--warmup", help="warm-up iterations, not counted (default: 2, up to 10 "
                                      "within a tenth of --time-budget)"),
    iterations: int | None = typer.Option(None, "--iterations", "-n", help="profiled iterations (default: as many as "
                                          "fit in --time-budget, 5 to 100)"),
    time_budget: float = typer.Option(60.0, "--time-budget", help="seconds the automatic --iterations aim at"),
    hooks: str = typer.Option("specialized", "--hooks", help="specialized (units, low overhead) | generic (every module)"),
    module_iterations: int = typer.Option(5, "--module-iterations", help="extra generic-hook iterations for the module breakdown (0: none)"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto"),
    dashboard: bool = typer.Option(True, "--dashboard/--no-dashboard", help="write dashboard.html and summary.png"),
    name: str | None = typer.Option(None, "--name", help="model name in the outputs"),
    threads: int | None = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's choice)"),
    formats: str = typer.Option("float32", "--formats", help="weight formats to profile, comma-separated "
                                "(float32,bfloat16,int8,int4); each other than float32 goes under formats/<name>"),
) -> None:
    """Profile a model unit by unit (prefill and decode) and write the profile the planner reads."""
    require_exec("noodle profile")
    from noodle.profile import ObservabilityEngine, ProfileConfig

    cfg = ProfileConfig(  # validates the numbers before the model is built
        model_name=name or "model", strategy=hooks, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
        batch_size=batch_size, warmup=10 if warmup is None else warmup, iterations=iterations or 100,
        module_iterations=module_iterations,
        device=device, seed=seed, progress=True,
    )
    for flag, value, top in (("--prompt-tokens", prompt_tokens, 2**24), ("--decode-tokens", decode_tokens, 2**24),
                             ("--batch-size", batch_size, 2**16), ("--warmup", cfg.warmup, 10**6),
                             ("--iterations", cfg.iterations, 10**6), ("--module-iterations", module_iterations, 10**6)):
        check_int(flag, value, ge=0, le=top)  # lower bounds: ProfileConfig above
    check_int("--seed", seed, ge=0, le=MAX_SEED)
    if not math.isfinite(time_budget) or not 1 <= time_budget <= 86400:
        raise SpecError(f"--time-budget: must be between 1 and 86400 seconds, got {time_budget}")
    if iterations is None and warmup == 0:
        raise SpecError("--warmup 0 needs --iterations N (the automatic count is timed on warm-up iterations)")
    fmts = _formats(formats, device)
    if out is not None:
        out = _output_folder(out)
    if threads is not None:
        if threads < 1:
            raise SpecError(f"--threads: must be at least 1, got {threads}")
        check_threads("--threads", threads, minimum=1)
        import torch

        torch.set_num_threads(threads)  # recorded in system_info.json and the reference device
    quiet_transformers()
    lm, model_name, source = open_model(model, config, preset, seed)
    cfg = replace(cfg, model_name=name or model_name, source=source)
    folder = out or _output_folder(Path("runs") / "profile" / cfg.model_name)
    console = stdout_console()
    engine = ObservabilityEngine(lm, folder, cfg)
    with engine:
        inputs = engine.make_inputs()
        n, warmed = _warm_and_count(engine, inputs, warmup, iterations, time_budget, cfg)
        cfg = engine.config = replace(engine.config, iterations=n, warmup=warmed)  # what profile_config.json records
        report = engine.profile(inputs, n)
        if dashboard:
            engine.save_dashboard(f"noodle profile: {cfg.model_name}")
    _render(report, folder, console)
    if fmts:
        _profile_formats(fmts, lm, model, config, preset, seed, cfg, folder, console)


def _warm_and_count(engine: Any, inputs: Any, warmup: int | None, iterations: int | None, budget_s: float,
                    cfg: Any) -> tuple[int, int]:  # fmt: skip
    """Run the warm-up, time an iteration on it, and say how long profiling will take.

    Returns (profiled iterations, warm-up iterations run).

    Automatic counts: warm-up 2 iterations (up to 10 while within a tenth of ``budget_s``); profiled iterations
    as many as fit in ``budget_s`` (5 to 100). Counts the user gave are run as given.
    """
    per = None
    warm = 2 if warmup is None else warmup
    if warm > 1:
        engine.warmup(inputs, warm - 1)
    if warm > 0:
        t0 = time.perf_counter()
        engine.warmup(inputs, 1)
        per = time.perf_counter() - t0
    if warmup is None and per is not None:
        extra = min(8, int(0.1 * budget_s / per))
        if extra > 0:
            engine.warmup(inputs, extra)
            warm += extra
    n = iterations if iterations is not None else max(5, min(100, int(budget_s / per))) if per else 100
    if per is not None:
        modules = cfg.module_iterations if cfg.strategy == "specialized" else 0
        _log.info("profiling %d iteration(s) (prefill of %d tokens + %d decode steps, %.2f s each)%s: about %.0f s",
                  n, cfg.prompt_tokens, cfg.decode_tokens, per,
                  f", then {modules} with every module timed" if modules else "", per * (n + modules))  # fmt: skip
    return n, warm


def _formats(text: str, device: str) -> list[str]:
    """The formats of ``--formats`` other than float32 (always profiled), checked against the device."""
    from noodle.formats import FORMATS, format_problem

    names = [f.strip() for f in text.split(",") if f.strip()]
    for name in names:
        wrong = format_problem(name, "cuda" if device in ("cuda", "auto") else "cpu")
        if wrong:
            raise SpecError(f"--formats: {name}: {wrong}")
    return [f for f in FORMATS if f in names and f != "float32"]


def _profile_formats(fmts: list[str], lm: Any, model: Path | None, config: Path | None, preset: str | None,
                     seed: int, cfg: Any, out: Path, console: Console) -> None:
    """Profile the model again in each format and add the figures to ``out``/units.json."""
    import json

    from noodle.profile import ObservabilityEngine
    from noodle.profile.formats import format_param_bytes, merge_format_units, put_in_format

    base = [u["param_bytes"] for u in json.loads((out / "units.json").read_text(encoding="utf-8"))["units"]]
    for fmt in fmts:
        folder = out / "formats" / fmt
        again, _, _ = open_model(model, config, preset, seed)
        put_in_format(again, fmt, "cuda" if cfg.device == "cuda" else "cpu")
        engine = ObservabilityEngine(again, folder, replace(cfg, model_name=f"{cfg.model_name} ({fmt})",
                                                            module_iterations=0))
        with engine:
            inputs = engine.make_inputs()
            engine.warmup(inputs)
            report = engine.profile(inputs)
        merge_format_units(out, fmt, folder, format_param_bytes(lm, base, fmt))
        decode = sum(u.latency_ms for u in report.units) if hasattr(report, "units") else None
        console.print(f"format {fmt}: profiled into {folder}" + (f" ({decode:.2f} ms per decode step)" if decode else ""))


def register(app: typer.Typer) -> None:
    app.command("profile")(profile_cmd)
