"""``noodle bench distributed``: local vs torchrpc vs gRPC decode tokens/s and per-hop overhead on loopback."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import typer

from noodle.cli.output import stderr_console, stdout_console
from noodle.errors import SpecError

__all__ = ["register", "bench_distributed_cmd", "run_distributed_bench"]


def run_distributed_bench(
    preset: str = "gpt2", stages: int = 3, rounds: int = 5, warmup: int = 1, prompt_tokens: int = 32,
    decode_tokens: int = 32, threads: int = 1, modes: str = "local,torchrpc,grpc,grpc-unary",
    out: Path = Path("bench/results"), seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Build ``preset`` with random weights, measure, print a table, write JSON/CSV/PNG to ``out``."""
    from rich.table import Table

    from noodle.cli.bench import use_bench


    use_bench()

    from bench.distbench import measure_distributed, write_distributed
    from noodle.models import init_model

    for flag, value, least in (("--stages", stages, 1), ("--rounds", rounds, 1), ("--warmup", warmup, 0),
                               ("--prompt-tokens", prompt_tokens, 1), ("--decode-tokens", decode_tokens, 3),
                               ("--threads", threads, 1)):  # fmt: skip
        if value < least:
            raise SpecError(f"{flag}: must be at least {least}, got {value}")
    err = stderr_console()
    with tempfile.TemporaryDirectory(prefix="noodle-bench-") as tmp:
        with err.status(f"building {preset} with random weights"):
            model_dir = init_model(preset, Path(tmp) / preset, seed=seed)
        result = measure_distributed(
            model_dir, stages=stages, rounds=rounds, warmup=warmup, prompt_tokens=prompt_tokens,
            decode_tokens=decode_tokens, threads=threads, seed=seed,
            modes=tuple(m.strip() for m in modes.split(",") if m.strip()), log=lambda line: err.print(line, style="dim"),
        )  # fmt: skip
    result["model"] = preset
    paths = write_distributed(result, out)
    floor = result["tcp_pingpong"]
    table = Table(title=f"{preset}, {stages} stages, decode batch 1 ({rounds} interleaved rounds, {threads} thread(s) each)")
    for col in ("mode", "step p50 ms", "tokens/s", "vs local", "added ms/hop", "network ms/hop", "network share"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for mode, e in result["modes"].items():
        table.add_row(
            mode, f"{e['step_ms_p50']:.2f}", f"{e['tokens_per_s']:.1f}", f"{e['ratio_vs_local']:.0%}",
            "-" if mode == "local" else f"{e['added_ms_per_hop']:.3f}",
            f"{e['network_ms_per_hop']:.3f}" if "network_ms_per_hop" in e else "-",
            f"{e['network_share']:.0%}" if "network_share" in e else "-",
        )  # fmt: skip
    console = stdout_console()
    console.print(table)
    console.print(f"TCP ping-pong floor: {floor['bytes']} B round trip {floor['rtt_us_p50']:.0f} us (p50)")
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return result


def bench_distributed_cmd(
    preset: str = typer.Option("gpt2", "--preset", help="model preset (random weights)"),
    stages: int = typer.Option(3, "--stages", help="stages = worker processes"),
    rounds: int = typer.Option(5, "--rounds", help="interleaved rounds (each runs every mode once)"),
    warmup: int = typer.Option(1, "--warmup", help="warm-up rounds, not counted"),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens"),
    decode_tokens: int = typer.Option(32, "--decode-tokens"),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads per process (coordinator and workers)"),
    modes: str = typer.Option("local,torchrpc,grpc,grpc-unary", "--modes", help="modes to compare (local is the baseline)"),
    out: Path = typer.Option(Path("bench/results"), "--out", "-o", help="results folder"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Distributed executors on loopback: decode tokens/s vs local and ms added per hop (TCP floor beside)."""
    from noodle.extras import require_exec

    require_exec("noodle bench distributed")
    run_distributed_bench(preset, stages, rounds, warmup, prompt_tokens, decode_tokens, threads, modes, out, seed)


def register(app: typer.Typer) -> None:
    from noodle.cli.bench import bench_app

    bench_app.command("distributed")(bench_distributed_cmd)
