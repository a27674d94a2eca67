"""``noodle bench profile``: hook overhead of the profiler vs an uninstrumented run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from noodle.cli.output import stdout_console
from noodle.errors import SpecError

__all__ = ["register", "run_profile_bench"]


def run_profile_bench(
    preset: str = "gpt2", rounds: int = 30, warmup: int = 2, prompt_tokens: int = 32, decode_tokens: int = 32,
    out: Path = Path("bench/results"), seed: int = 0, progress: bool = True, threads: int | None = None,
) -> dict:
    """Measure the overhead on a preset model, print a table, write JSON/CSV/PNG to ``out``."""
    from noodle.cli.bench import use_bench
    from noodle.models import build_model, load_config

    use_bench()
    from bench.profilebench import measure_overhead, write_overhead

    for flag, value, least in (("--rounds", rounds, 1), ("--warmup", warmup, 0), ("--prompt-tokens", prompt_tokens, 1),
                               ("--decode-tokens", decode_tokens, 1)):
        if value < least:
            raise SpecError(f"{flag}: must be at least {least}, got {value}")
    if threads is not None:
        if threads < 1:
            raise SpecError(f"--threads: must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    model = build_model(load_config(preset), seed=seed)
    result = measure_overhead(model, model_name=preset, rounds=rounds, warmup=warmup, prompt_tokens=prompt_tokens,
                              decode_tokens=decode_tokens, seed=seed, progress=progress)
    paths = write_overhead(result, out)
    table = Table(title=f"profiler hook overhead, {preset} on {result['device']} ({rounds} interleaved rounds)")
    for col in ("hooks", "decode p50 ms", "decode overhead", "decode +ms", "decode est.", "prefill p50 ms",
                "prefill overhead"):
        table.add_column(col, justify="left" if col == "hooks" else "right", no_wrap=col == "hooks")
    for mode, e in result["modes"].items():
        if mode == "none":
            table.add_row(mode, f"{e['decode_ms_p50']:.3f}", "-", "-", "-", f"{e['prefill_ms_p50']:.3f}", "-")
            continue
        table.add_row(
            mode, f"{e['decode_ms_p50']:.3f}", f"{e['decode_overhead_pct']:+.2f}%", f"{e['decode_overhead_ms']:+.3f}",
            f"{e['decode_estimated_pct']:+.2f}%", f"{e['prefill_ms_p50']:.3f}", f"{e['prefill_overhead_pct']:+.2f}%",
        )
    console = stdout_console()
    console.print(table)
    console.print(f"one hooked module call costs {result['hook_call_cost_us']:.2f} us; est. = hooked modules x that "
                  "/ uninstrumented forward", style="dim")
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return result


def bench_profile_cmd(
    preset: str = typer.Option("gpt2", "--preset", help="model preset to measure"),
    rounds: int = typer.Option(30, "--rounds", help="interleaved rounds (each decodes one request per mode)"),
    warmup: int = typer.Option(2, "--warmup", help="warm-up rounds, not counted"),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens"),
    decode_tokens: int = typer.Option(32, "--decode-tokens"),
    out: Path = typer.Option(Path("bench/results"), "--out", "-o", help="results folder"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's choice)"),
) -> None:
    """Overhead of specialized and generic profiler hooks vs no hooks (interleaved, one process)."""
    from noodle.extras import require_exec

    require_exec("noodle bench profile")
    run_profile_bench(preset, rounds, warmup, prompt_tokens, decode_tokens, out, seed, threads=threads)


def register(app: typer.Typer) -> None:
    from noodle.cli.bench import bench_app

    bench_app.command("profile")(bench_profile_cmd)
