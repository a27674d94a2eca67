"""``noodle bench profile``: hook overhead of the profiler vs an uninstrumented run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from noodle.errors import SpecError

__all__ = ["register", "run_profile_bench"]


def run_profile_bench(
    preset: str = "gpt2", rounds: int = 30, warmup: int = 3, prompt_tokens: int = 64, decode_tokens: int = 16,
    out: Path = Path("bench/results"), seed: int = 0, progress: bool = True,
) -> dict:
    """Measure the overhead on a preset model, print a table, write JSON/CSV/PNG to ``out``."""
    from noodle.models import build_model, load_config
    from noodle.profile.overhead import measure_overhead, write_overhead

    for flag, value, least in (("--rounds", rounds, 1), ("--warmup", warmup, 0), ("--prompt-tokens", prompt_tokens, 1),
                               ("--decode-tokens", decode_tokens, 1)):
        if value < least:
            raise SpecError(f"{flag}: must be at least {least}, got {value}")
    model = build_model(load_config(preset), seed=seed)
    result = measure_overhead(model, model_name=preset, rounds=rounds, warmup=warmup, prompt_tokens=prompt_tokens,
                              decode_tokens=decode_tokens, seed=seed, progress=progress)
    paths = write_overhead(result, out)
    table = Table(title=f"profiler hook overhead, {preset} on {result['device']} ({rounds} interleaved rounds)")
    for col in ("hooks", "decode p50 ms", "decode overhead", "prefill p50 ms", "prefill overhead", "iteration overhead"):
        table.add_column(col, justify="left" if col == "hooks" else "right", no_wrap=col == "hooks")
    for mode, e in result["modes"].items():
        pct = (lambda k: "-" if mode == "none" else f"{e[k]:+.2f}%")  # noqa: E731
        table.add_row(mode, f"{e['decode_ms_p50']:.3f}", pct("decode_overhead_pct"), f"{e['prefill_ms_p50']:.3f}",
                      pct("prefill_overhead_pct"), pct("iteration_overhead_pct"))
    console = Console()
    console.print(table)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return result


def bench_profile_cmd(
    preset: str = typer.Option("gpt2", "--preset", help="model preset to measure"),
    rounds: int = typer.Option(30, "--rounds", help="interleaved rounds (each runs every mode once)"),
    warmup: int = typer.Option(3, "--warmup", help="warm-up rounds, not counted"),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens"),
    decode_tokens: int = typer.Option(16, "--decode-tokens"),
    out: Path = typer.Option(Path("bench/results"), "--out", "-o", help="results folder"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Overhead of specialized and generic profiler hooks vs no hooks (interleaved, one process)."""
    run_profile_bench(preset, rounds, warmup, prompt_tokens, decode_tokens, out, seed)


def register(app: typer.Typer) -> None:
    from noodle.cli.bench import bench_app

    bench_app.command("profile")(bench_profile_cmd)
