"""``noodle solve spec.yaml``: plan a spec and print or write the plan."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from noodle.cli.checks import check_float
from noodle.cli.output import stderr_console, stdout_console
from noodle.errors import SpecError
from noodle.graph.build import build_cost_graph
from noodle.plandoc import PlanDoc, dump_plan, plan_document
from noodle.solvers import SOLVERS, check_options, solve
from noodle.sizes import MAX_TIME_LIMIT_S
from noodle.joint import JointProblem
from noodle.jointdoc import JointPlanDoc, dump_joint_plan, joint_document
from noodle.solvers.joint import JOINT_SOLVERS, solve_joint
from noodle.spec import load_joint_spec

__all__ = ["register", "render_table", "render_joint"]

FORMATS = ("table", "json", "yaml")


def render_table(doc: PlanDoc, console: Console) -> None:
    """The human view of a plan: stages, predictions, solver status."""
    table = Table(title=f"plan for {doc.name} (objective: {doc.objective})", show_lines=False)
    for col in ("stage", "node", "device", "units", "compute ms", "out ms", "total ms", "memory MiB"):
        table.add_column(col, justify="right" if "ms" in col or "MiB" in col else "left")
    for s in doc.stages:
        units = s.layers[0] if len(s.layers) == 1 else f"{s.layers[0]}..{s.layers[-1]} ({len(s.layers)})"
        table.add_row(
            str(s.stage_id), s.node, s.device, units, f"{s.compute_ms:.3f}", f"{s.hop_ms:.3f}",
            f"{s.expected_latency_ms:.3f}", f"{s.memory_required_mb:.0f} / {s.memory_available_mb:.0f}",
        )
    console.print(table)
    p, sv = doc.predicted, doc.solver
    gap = "n/a" if sv.gap is None else f"{sv.gap:.2%}"
    console.print(
        f"token latency {p.token_latency_ms:.3f} ms | bottleneck {p.bottleneck_ms:.3f} ms | "
        f"{p.tokens_per_s:.1f} tokens/s | objective {doc.objective_ms:.4f} ms"
    )
    if p.streams is not None and p.pipeline_tokens_per_s is not None and p.round_ms:
        console.print(
            f"continuous batching: {p.streams} streams in {doc.workload.get('concurrency', 1)} batch(es) of "
            f"{p.step_batch} -> {p.pipeline_tokens_per_s:.1f} tokens/s (round {p.round_ms:.3f} ms: every stream "
            f"gains one token per round)",
            highlight=False,
        )
    elif p.pipeline_tokens_per_s is not None and p.token_latency_ms > 0 and p.bottleneck_ms > 0:
        groups, batch = doc.workload.get("concurrency", 1), doc.workload.get("batch_size", 1)
        saturate = math.ceil(p.token_latency_ms / p.bottleneck_ms - 1e-9)
        console.print(
            f"pipelined: {groups} group(s) of {batch} in flight -> {p.pipeline_tokens_per_s:.1f} tokens/s "
            f"(one group: {batch * 1e3 / p.token_latency_ms:.1f}; {saturate}+ groups keep every stage busy: "
            f"{batch * 1e3 / p.bottleneck_ms:.1f})",
            highlight=False,
        )
    console.print(f"solver {sv.name}: {sv.status}, gap {gap}, {sv.solve_time_s:.2f} s" + (f" - {sv.note}" if sv.note else ""))
    for s in doc.stages:
        console.print(f"  stage {s.stage_id}: {s.rationale}", style="dim")


def render_joint(doc: JointPlanDoc, console: Console) -> None:
    """The human view of a joint plan: one table per model, then the shared nodes."""
    for m in doc.models:
        share = f"requires {m.weight:g} tokens/s" if m.required else f"weight {m.weight:g}"
        table = Table(title=f"{doc.name}: model {m.name} ({share}) -> {m.tokens_per_s:.1f} tokens/s")
        for col in ("stage", "node", "device", "units", "compute ms", "out ms", "round share ms", "memory MiB"):
            table.add_column(col, justify="right" if "ms" in col or "MiB" in col else "left")
        for s in (s for s in doc.stages if s.model == m.name):
            units = s.layers[0] if len(s.layers) == 1 else f"{s.layers[0]}..{s.layers[-1]} ({len(s.layers)})"
            table.add_row(str(s.stage_id), s.node, s.device, units, f"{s.compute_ms:.3f}", f"{s.hop_ms:.3f}",
                          f"{s.round_share_ms:.3f}", f"{s.memory_required_mb:.0f}")
        console.print(table)
    nodes = Table(title="shared nodes (round: every model m gains its weight in tokens)")
    for col in ("node", "device", "round ms", "memory MiB"):
        nodes.add_column(col, justify="right" if "ms" in col or "MiB" in col else "left")
    for n in doc.nodes:
        nodes.add_row(n.id, n.device, f"{n.round_ms:.3f}", f"{n.memory_used_mb:.0f} / {n.memory_available_mb:.0f}")
    console.print(nodes)
    sv = doc.solver
    gap = "n/a" if sv.gap is None else f"{sv.gap:.2%}"
    console.print(f"objective {doc.objective}: busiest round {doc.objective_ms:.4f} ms | " + ", ".join(
        f"{m.name} {m.tokens_per_s:.1f}" for m in doc.models) + " tokens/s", highlight=False)
    console.print(f"solver {sv.name}: {sv.status}, gap {gap}, {sv.solve_time_s:.2f} s" + (f" - {sv.note}" if sv.note else ""))


def _solve_joint(spec: Path, jp: JointProblem, name: str, limit: float, out: Path | None, fmt: str,
                 flags: Mapping[str, object]) -> None:
    """``noodle solve`` for a spec with ``models:``."""
    for flag, value in flags.items():
        if value is not None:
            raise SpecError(f"{flag}: not available for a spec with models ({spec}); drop it")
    if name not in JOINT_SOLVERS:
        raise SpecError(f"solver: {name!r} does not place several models; use one of {', '.join(JOINT_SOLVERS)}")
    err = stderr_console()
    with err.status(f"solving {jp.name}: {len(jp.models)} models on {len(jp.cluster.nodes)} nodes with {name} "
                    f"(limit {limit:g} s)"):
        result = solve_joint(jp, solver=name, time_limit_s=limit)
    doc = joint_document(jp, result)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dump_joint_plan(doc, "yaml" if out.suffix in (".yaml", ".yml") else "json"))
        err.print(f"plan written to {out}")
    if fmt == "table":
        render_joint(doc, stdout_console())
    else:
        sys.stdout.write(dump_joint_plan(doc, fmt))


def solve_cmd(
    spec: Path = typer.Argument(..., help="spec file (YAML)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="write the plan here (.json or .yaml)"),
    fmt: str = typer.Option("table", "--format", "-f", help="stdout format: table | json | yaml"),
    solver: str | None = typer.Option(None, "--solver", "-s", help="override solver.name from the spec"),
    time_limit: float | None = typer.Option(None, "--time-limit", "-t", help="override solver.time_limit_s (seconds)"),
    objective: str | None = typer.Option(None, "--objective", help="override objective: throughput | latency"),
    graph: Path | None = typer.Option(None, "--graph", help="also write the cost graph as GraphML"),
) -> None:
    """Solve a placement spec: which node runs which layers."""
    if fmt not in FORMATS:
        raise SpecError(f"--format: {fmt!r} is not a format; use one of {', '.join(FORMATS)}")
    if objective is not None and objective not in ("throughput", "latency"):
        raise SpecError(f"--objective: {objective!r}; use throughput or latency")
    if time_limit is not None:
        check_float("--time-limit", time_limit, gt=0, le=MAX_TIME_LIMIT_S)
    err = stderr_console()
    spec_obj, problem = load_joint_spec(spec)
    if isinstance(problem, JointProblem):
        if spec_obj.solver.options:
            raise SpecError(f"{spec}: solver.options: not taken when placing several models; drop them")
        flags = {"--objective": objective, "--graph": graph}
        return _solve_joint(spec, problem, solver or spec_obj.solver.name, time_limit or spec_obj.solver.time_limit_s,
                            out, fmt, flags)
    if objective:
        problem = replace(problem, objective=objective)
    name = solver or spec_obj.solver.name
    if name not in SOLVERS:
        where = "--solver" if solver else f"{spec}: solver.name"
        raise SpecError(f"{where}: unknown solver {name!r}; valid names: {', '.join(SOLVERS.names())}")
    options: dict = {}
    if spec_obj.solver.options:
        if name == spec_obj.solver.name:
            options = check_options(SOLVERS.get(name), spec_obj.solver.options, where=f"{spec}: solver.options")
        else:
            err.print(f"note: {spec}: solver.options are for {spec_obj.solver.name!r}, not used with --solver {name}")
    limit = time_limit or spec_obj.solver.time_limit_s
    with err.status(f"solving {problem.name}: {problem.num_units} units on {len(problem.cluster.nodes)} nodes "
                    f"with {name} (limit {limit:g} s)"):
        result = solve(problem, solver=name, time_limit_s=limit, options=options)
    doc = plan_document(problem, result)
    if graph is not None:
        import networkx as nx

        g = build_cost_graph(problem.units, problem.cluster, problem.workload)
        g.graph.clear()  # GraphML holds scalar attributes only (a node's profile is not one), and no None
        for _, attrs in [*g.nodes(data=True), *((None, d) for *_, d in g.edges(data=True))]:
            for key in [k for k, v in attrs.items() if v is None or not isinstance(v, (str, int, float, bool))]:
                del attrs[key]
        try:
            nx.write_graphml(nx.relabel_nodes(g, lambda k: f"{k[0]}:{k[1]}"), graph)
        except OSError as exc:
            raise SpecError(f"--graph: cannot write {graph} ({exc.strerror})") from None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dump_plan(doc, "yaml" if out.suffix in (".yaml", ".yml") else "json"))
        err.print(f"plan written to {out}")
    if fmt == "table":
        render_table(doc, stdout_console())
    else:
        sys.stdout.write(dump_plan(doc, fmt))


def register(app: typer.Typer) -> None:
    app.command("solve")(solve_cmd)
