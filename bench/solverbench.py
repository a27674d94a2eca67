"""The solver comparison benchmark: every solver and baseline on seeded heterogeneous instances.

Instances come from :func:`bench.generate.bench_grid` (real architectures on
clusters of 3 to 64 nodes). Every solver runs on every instance in this one process,
one after the other, under the same time limit; a row records the objective, the best
bound, the gap, the status and the wall time. Per instance, the *best known* value is
the least objective any solver reached and the *best bound* the greatest bound any
exact method proved; quality is ``objective / best known``.

Timings are wall-clock on whatever machine runs this (the committed results come from
a 2-core machine shared with other work): compare ratios within one run.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from bench.generate import GridPoint, bench_grid, random_instance
from noodle.errors import InfeasibleError, NoodleError
from noodle.graph.costmodel import DefaultCostModel
from noodle.solvers.base import SOLVERS, relative_gap
from noodle.solvers.tables import build_tables
from noodle.types import Problem

__all__ = ["run_benchmark", "run_targets", "summarise", "write_results", "DEFAULT_SOLVERS"]

DEFAULT_SOLVERS = (
    "auto", "cpsat", "milp", "heuristic",
    "baseline-uniform", "baseline-params", "baseline-memory", "baseline-petals",
)


def _run_one(problem, name: str, time_limit_s: float) -> dict[str, Any]:
    from noodle.solvers.run import solve

    t0 = time.perf_counter()
    try:
        res = solve(problem, solver=name, time_limit_s=time_limit_s)
    except InfeasibleError as exc:
        return {"status": "infeasible", "objective_ms": None, "bound_ms": None, "time_s": time.perf_counter() - t0,
                "note": str(exc)}
    except NoodleError as exc:
        return {"status": "no plan", "objective_ms": None, "bound_ms": None, "time_s": time.perf_counter() - t0,
                "note": str(exc)}
    return {
        "status": res.status, "objective_ms": res.objective_ms, "bound_ms": res.bound_ms,
        "time_s": res.solve_time_s, "stages": len(res.plan.stages) if res.plan else None, "note": res.note,
        "solver_detail": res.solver,
    }


def run_benchmark(
    *,
    size: str = "default",
    seeds: int = 2,
    time_limit_s: float = 5.0,
    solvers: tuple[str, ...] = DEFAULT_SOLVERS,
    grid: list[GridPoint] | None = None,
    problems: list[Problem] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``solvers`` on the instances of ``bench_grid(size, seeds)`` (or ``grid``, or ready ``problems``)."""
    for s in solvers:
        SOLVERS.get(s)  # unknown names fail before any work
    points: list[GridPoint | Problem] = list(problems) if problems is not None else (
        list(grid) if grid is not None else list(bench_grid(size, seeds)))
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    bar = None
    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TextColumn("{task.fields[current]}"))
        bar.start()
        task = bar.add_task("bench solvers", total=len(points) * len(solvers), current="")
    try:
        for pt in points:
            if isinstance(pt, GridPoint):
                problem = random_instance(pt.seed, arch=pt.arch, n_nodes=pt.n_nodes, objective=pt.objective,
                                          jitter=pt.jitter)
                base = {"instance": problem.name, "arch": pt.arch, "units": problem.num_units, "nodes": pt.n_nodes,
                        "objective": pt.objective, "seed": pt.seed, "jitter": pt.jitter}
            else:
                problem = pt
                base = {"instance": problem.name, "arch": "custom", "units": problem.num_units,
                        "nodes": len(problem.cluster.nodes), "objective": problem.objective, "seed": None,
                        "jitter": None}
            group = []
            for name in solvers:
                if bar is not None:
                    bar.update(task, current=f"{problem.name}: {name}")
                row = {**base, "solver": name, **_run_one(problem, name, time_limit_s)}
                group.append(row)
                if bar is not None:
                    bar.advance(task)
            best = min((r["objective_ms"] for r in group if r["objective_ms"] is not None), default=None)
            bound = max((r["bound_ms"] for r in group if r["bound_ms"] is not None), default=None)
            for r in group:
                r["best_known_ms"] = best
                r["best_bound_ms"] = bound
                r["gap"] = (relative_gap(r["objective_ms"], r["bound_ms"])
                            if r["objective_ms"] is not None and r["bound_ms"] is not None else None)
                r["quality"] = (r["objective_ms"] / best if r["objective_ms"] is not None and best else None)
            rows.extend(group)
    finally:
        if bar is not None:
            bar.stop()
    return {
        "benchmark": "solvers",
        "size": size if grid is None and problems is None else "custom",
        "seeds": seeds,
        "time_limit_s": time_limit_s,
        "solvers": list(solvers),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": __import__("os").cpu_count()},
        "wall_s": time.perf_counter() - started,
        "rows": rows,
        "summary": summarise(rows),
    }


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per solver: plans, proofs, median/max quality and gap, median time; the headline ratio vs baselines."""
    out: dict[str, Any] = {"solvers": {}}
    names = list(dict.fromkeys(r["solver"] for r in rows))
    for name in names:
        mine = [r for r in rows if r["solver"] == name]
        q = [r["quality"] for r in mine if r["quality"] is not None]
        g = [r["gap"] for r in mine if r["gap"] is not None]
        out["solvers"][name] = {
            "instances": len(mine),
            "plans": sum(r["objective_ms"] is not None for r in mine),
            "optimal": sum(r["status"] == "optimal" for r in mine),
            "median_quality": _median(q),
            "max_quality": max(q) if q else None,
            "median_gap": _median(g),
            "max_gap": max(g) if g else None,
            "median_time_s": _median([r["time_s"] for r in mine]),
            "max_time_s": max(r["time_s"] for r in mine),
        }
    # Headline: optimal/best plan vs each baseline, bottleneck (throughput instances) and latency.
    head: dict[str, Any] = {}
    for obj in ("throughput", "latency"):
        inst = {r["instance"] for r in rows if r["objective"] == obj}
        for name in names:
            if not name.startswith("baseline-"):
                continue
            ratios, missing = [], 0
            for i in inst:
                r = next(x for x in rows if x["instance"] == i and x["solver"] == name)
                if r["objective_ms"] is None or not r["best_known_ms"]:
                    missing += 1
                else:
                    ratios.append(r["objective_ms"] / r["best_known_ms"])
            head[f"{obj}/{name}"] = {
                "median_ratio": _median(ratios),
                "geomean_ratio": math.exp(statistics.fmean(math.log(x) for x in ratios)) if ratios else None,
                "min_ratio": min(ratios) if ratios else None,
                "placed": len(ratios),
                "could_not_place": missing,
            }
    out["best_vs_baselines"] = head
    return out


def write_results(result: dict[str, Any], folder: str | Path, stem: str = "solvers") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.csv``, ``<stem>_time.png`` and ``<stem>_quality.png`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{stem}.json", "csv": folder / f"{stem}.csv",
             "time_png": folder / f"{stem}_time.png", "quality_png": folder / f"{stem}_quality.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=float) + "\n")
    cols = ["instance", "arch", "units", "nodes", "objective", "seed", "solver", "status", "objective_ms",
            "bound_ms", "gap", "time_s", "best_known_ms", "best_bound_ms", "quality", "stages"]
    with paths["csv"].open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in result["rows"]:
            w.writerow([r.get(c, "") if r.get(c) is not None else "" for c in cols])
    _plots(result, paths)
    return paths


def _plots(result: dict[str, Any], paths: dict[str, Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    exact = [s for s in result["solvers"] if not s.startswith("baseline-")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, obj in zip(axes, ("throughput", "latency")):
        for name in exact:
            pts = [(r["units"] * r["nodes"], r["time_s"], r["status"] == "optimal")
                   for r in rows if r["solver"] == name and r["objective"] == obj]
            if not pts:
                continue
            xs, ys, opt = zip(*pts)
            line = ax.scatter(xs, ys, s=18, label=name, alpha=0.8)
            ax.scatter([x for x, o in zip(xs, opt) if not o], [y for y, o in zip(ys, opt) if not o], s=60,
                       facecolors="none", edgecolors=line.get_facecolor(), linewidths=1)
        ax.axhline(result["time_limit_s"], color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("units x nodes")
        ax.set_title(f"{obj}: solve time (hollow ring: not proven optimal)", fontsize=9)
    axes[0].set_ylabel("wall time (s)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["time_png"], dpi=100)
    plt.close(fig)

    names = result["solvers"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, obj in zip(axes, ("throughput", "latency")):
        data, labels = [], []
        for name in names:
            q = [r["quality"] for r in rows if r["solver"] == name and r["objective"] == obj and r["quality"]]
            if q:
                data.append(q)
                labels.append(f"{name}\n({len(q)})")
        if data:
            ax.boxplot(data, showfliers=True)
            ax.set_xticks(range(1, len(labels) + 1), labels, rotation=35, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", linewidth=1)
        ax.set_title(f"{obj}: objective / best known (lower is better; n plans placed)", fontsize=9)
    axes[0].set_ylabel("plan quality vs best known")
    fig.tight_layout()
    fig.savefig(paths["quality_png"], dpi=100)
    plt.close(fig)


def run_targets(*, seeds: int = 10, big_seeds: int = 5, time_limit_s: float = 10.0, progress: bool = True) -> dict:
    """The issue's targets, measured: proof time on 50 units x 8 nodes, gap on 98 x 32 at ``time_limit_s``,
    heuristic quality and time on 50 x 8 (against the proven optimum), all on jittered heterogeneous clusters."""
    from noodle.solvers.run import solve
    from noodle.solvers.exact.subsetdp import solve_subset_dp

    jobs = [("proof", "gpt2-xl", 8, obj, s) for obj in ("throughput", "latency") for s in range(seeds)]
    jobs += [("big", "gpt3-175b", 32, obj, s) for obj in ("throughput", "latency") for s in range(big_seeds)]
    jobs += [("heuristic", "gpt2-xl", 8, obj, 100 + s) for obj in ("throughput", "latency") for s in range(seeds)]
    rows = []
    bar = None
    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        bar.start()
        task = bar.add_task("solver targets", total=len(jobs))
    try:
        for kind, arch, m, obj, seed in jobs:
            p = random_instance(seed, arch=arch, n_nodes=m, objective=obj)
            row = {"kind": kind, "instance": p.name, "units": p.num_units, "nodes": m, "objective": obj}
            if kind in ("proof", "big"):
                r = solve(p, solver="auto", time_limit_s=time_limit_s)
                row.update(status=r.status, time_s=r.solve_time_s, gap=r.gap, decided_by=r.solver)
            else:
                r = solve(p, solver="heuristic", time_limit_s=time_limit_s)
                tables = build_tables(p, DefaultCostModel())
                opt, _ = solve_subset_dp(tables, obj)
                # no plan where the set DP found one: infinitely far from the optimum
                gap = r.objective_ms / opt - 1 if r.objective_ms is not None else math.inf
                row.update(time_s=r.solve_time_s, gap_to_optimum=gap)
            rows.append(row)
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()

    def pick(kind: str, obj: str | None = None) -> list[dict]:
        return [r for r in rows if r["kind"] == kind and (obj is None or r["objective"] == obj)]

    summary: dict[str, Any] = {}
    for obj in ("throughput", "latency"):
        pr = pick("proof", obj)
        summary[f"50x8 {obj}"] = {
            "proven": sum(r["status"] == "optimal" for r in pr), "instances": len(pr),
            "median_time_s": _median([r["time_s"] for r in pr]), "max_time_s": max(r["time_s"] for r in pr),
        }
        big = pick("big", obj)
        gaps = [r["gap"] if r["gap"] is not None else float("inf") for r in big]
        summary[f"98x32 {obj}"] = {
            "proven": sum(r["status"] == "optimal" for r in big), "instances": len(big),
            "median_gap": _median(gaps), "max_gap": max(gaps), "within_1pct": sum(g <= 0.01 for g in gaps),
            "median_time_s": _median([r["time_s"] for r in big]),
        }
    hr = pick("heuristic")
    summary["heuristic 50x8"] = {
        "instances": len(hr), "median_gap": _median([r["gap_to_optimum"] for r in hr]),
        "max_gap": max(r["gap_to_optimum"] for r in hr), "median_time_s": _median([r["time_s"] for r in hr]),
        "max_time_s": max(r["time_s"] for r in hr),
    }
    return {"benchmark": "solver targets", "time_limit_s": time_limit_s, "rows": rows, "summary": summary,
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": __import__("os").cpu_count()}}
