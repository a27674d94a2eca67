"""``noodle bench solvers``: every solver and baseline on seeded heterogeneous instances."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from noodle.cli.output import stdout_console
from noodle.errors import SpecError

__all__ = ["register", "run_solver_bench", "results_folder", "SIZES", "RESULTS", "SCRATCH"]

SIZES = ("small", "default", "large")
RESULTS = Path("bench/results")  # the committed results the README and docs quote
SCRATCH = Path("out/bench/solvers")  # where a run writes unless told otherwise (ignored by git)


def results_folder(out: Path | None, commit_results: bool) -> Path:
    """``--out``, else the committed results with ``--commit-results``, else :data:`SCRATCH`."""
    if out is not None and commit_results:
        raise SpecError(f"--out {out} and --commit-results: give one (--commit-results writes {RESULTS})")
    return RESULTS if commit_results else (out if out is not None else SCRATCH)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def run_solver_bench(
    size: str = "default", seeds: int = 2, time_limit: float = 5.0, solvers: str | None = None,
    out: Path = SCRATCH, progress: bool = True,
) -> dict:
    """Run the benchmark, print the summary tables, write JSON/CSV/PNG into ``out``."""
    from noodle.cli.bench import use_bench
    from noodle.solvers.base import SOLVERS

    use_bench()
    from bench.solverbench import DEFAULT_SOLVERS, run_benchmark, write_results

    if size not in SIZES:
        raise SpecError(f"--size: {size!r} is not a size; use one of {', '.join(SIZES)}")
    if seeds < 1:
        raise SpecError(f"--seeds: must be at least 1, got {seeds}")
    if time_limit <= 0:
        raise SpecError(f"--time-limit: must be > 0 seconds, got {time_limit:g}")
    names = tuple(s.strip() for s in solvers.split(",")) if solvers else DEFAULT_SOLVERS
    for s in names:
        if s not in SOLVERS:
            raise SpecError(f"--solvers: unknown solver {s!r}; valid names: {', '.join(SOLVERS.names())}")
    result = run_benchmark(size=size, seeds=seeds, time_limit_s=time_limit, solvers=names, progress=progress)
    paths = write_results(result, out)
    console = stdout_console()
    table = Table(title=f"solvers on {len({r['instance'] for r in result['rows']})} instances "
                        f"(limit {time_limit:g} s each, {result['wall_s']:.0f} s in all)")
    for col in ("solver", "plans", "proven optimal", "median quality", "worst quality", "median gap", "worst gap",
                "median time s", "max time s"):
        table.add_column(col, justify="left" if col == "solver" else "right")
    for name, s in result["summary"]["solvers"].items():
        table.add_row(name, f"{s['plans']}/{s['instances']}", str(s["optimal"]), _fmt(s["median_quality"], ".4f"),
                      _fmt(s["max_quality"], ".4f"), _fmt(s["median_gap"], ".2%"), _fmt(s["max_gap"], ".2%"),
                      _fmt(s["median_time_s"], ".2f"), _fmt(s["max_time_s"], ".2f"))
    console.print(table)
    head = Table(title="best plan vs baselines (baseline objective / best known; higher = baseline worse)")
    for col in ("objective", "baseline", "median ratio", "geomean", "min", "placed", "could not place"):
        head.add_column(col, justify="left" if col in ("objective", "baseline") else "right")
    for key, h in result["summary"]["best_vs_baselines"].items():
        obj, name = key.split("/", 1)
        head.add_row(obj, name, _fmt(h["median_ratio"], ".2f"), _fmt(h["geomean_ratio"], ".2f"),
                     _fmt(h["min_ratio"], ".2f"), str(h["placed"]), str(h["could_not_place"]))
    console.print(head)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return result


def run_target_bench(seeds: int, time_limit: float, out: Path, progress: bool = True) -> dict:
    """Measure the solver targets (see :func:`bench.solverbench.run_targets`) and write them."""
    import json

    if seeds < 1:
        raise SpecError(f"--seeds: must be at least 1, got {seeds}")
    if time_limit <= 0:
        raise SpecError(f"--time-limit: must be > 0 seconds, got {time_limit:g}")
    from noodle.cli.bench import use_bench

    use_bench()
    from bench.solverbench import run_targets

    result = run_targets(seeds=seeds, time_limit_s=time_limit, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "solver_targets.json"
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    table = Table(title=f"solver targets (auto, limit {time_limit:g} s)")
    for col in ("case", "result"):
        table.add_column(col)
    for case, s in result["summary"].items():
        table.add_row(case, ", ".join(f"{k} {_fmt(v, '.4g') if isinstance(v, float) else v}" for k, v in s.items()))
    stdout_console().print(table)
    stdout_console().print(f"wrote {path}")
    return result


def bench_solvers_cmd(
    size: str = typer.Option("default", "--size", help="small (seconds) | default (~4 min) | large (64 nodes)"),
    seeds: int | None = typer.Option(None, "--seeds", help="instances per shape and objective [2; --targets: 10]"),
    time_limit: float | None = typer.Option(
        None, "--time-limit", "-t", help="seconds per solver per instance [5; --targets: 10]"
    ),
    solvers: str | None = typer.Option(None, "--solvers", help="comma-separated solver names (default: all)"),
    out: Path | None = typer.Option(None, "--out", "-o", help=f"results folder [{SCRATCH}]"),
    commit_results: bool = typer.Option(
        False, "--commit-results", help=f"write into the committed {RESULTS} (what the README quotes) instead"
    ),
    targets: bool = typer.Option(False, "--targets", help="measure the proof-time/gap/heuristic targets instead"),
) -> None:
    """Compare every solver and baseline on seeded heterogeneous clusters (3 to 64 nodes)."""
    out = results_folder(out, commit_results)
    if targets:
        run_target_bench(10 if seeds is None else seeds, 10.0 if time_limit is None else time_limit, out)
        return
    run_solver_bench(size, 2 if seeds is None else seeds, 5.0 if time_limit is None else time_limit, solvers, out)


def register(app: typer.Typer) -> None:
    from noodle.cli.bench import bench_app

    bench_app.command("solvers")(bench_solvers_cmd)
