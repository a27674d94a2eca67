"""``noodle plot plan.json``: draw a plan's stage balance, token timeline and memory to a PNG."""

from __future__ import annotations

from pathlib import Path

import typer

from noodle.cli.output import stderr_console
from noodle.plandoc import PlanDoc, load_plan

__all__ = ["register", "plot_plan"]


def plot_plan(doc: PlanDoc, out: Path) -> Path:
    """Render ``doc`` to ``out`` (PNG) with matplotlib; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bal, ax_time, ax_mem) = plt.subplots(3, 1, figsize=(9, 9), constrained_layout=True)
    labels = [f"{s.stage_id}: {s.node}\n{len(s.layers)} units" for s in doc.stages]
    xs = range(len(doc.stages))
    comp = [s.compute_ms for s in doc.stages]
    hop = [s.hop_ms for s in doc.stages]
    ax_bal.bar(xs, comp, label="compute", color="#4C72B0")
    ax_bal.bar(xs, hop, bottom=comp, label="hand-off (hop / token return)", color="#DD8452")
    ax_bal.axhline(doc.predicted.bottleneck_ms, ls="--", color="k", lw=1, label="bottleneck")
    ax_bal.set_xticks(list(xs), labels, fontsize=8)
    ax_bal.set_ylabel("ms per token")
    ax_bal.set_title(
        f"{doc.name}: stage balance ({doc.objective}, {doc.objective_ms:.3f} ms, solver {doc.solver.name} "
        f"{doc.solver.status})"
    )
    ax_bal.legend(fontsize=8)

    t = 0.0
    for s in doc.stages:
        ax_time.barh(s.stage_id, s.compute_ms, left=t, color="#4C72B0")
        t += s.compute_ms
        ax_time.barh(s.stage_id, s.hop_ms, left=t, color="#DD8452")
        t += s.hop_ms
    ax_time.set_yticks([s.stage_id for s in doc.stages], [s.node for s in doc.stages], fontsize=8)
    ax_time.invert_yaxis()
    ax_time.set_xlabel("ms")
    ax_time.set_title(f"one decoded token: {doc.predicted.token_latency_ms:.3f} ms end to end")

    used = [s.memory_required_mb / 1024 for s in doc.stages]
    cap = [s.memory_available_mb / 1024 for s in doc.stages]
    ax_mem.bar(xs, cap, color="#DDDDDD", label="node memory")
    ax_mem.bar(xs, used, color="#55A868", label="weights + KV cache")
    ax_mem.set_xticks(list(xs), labels, fontsize=8)
    ax_mem.set_ylabel("GiB")
    ax_mem.set_title("memory per stage")
    ax_mem.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_cmd(
    plan: Path = typer.Argument(..., help="plan file written by `noodle solve --out`"),
    out: Path = typer.Option(None, "--out", "-o", help="PNG to write (default: next to the plan)"),
) -> None:
    """Draw a plan (stage balance, token timeline, memory) to a PNG."""
    doc = load_plan(plan)
    target = out or plan.with_suffix(".png")
    plot_plan(doc, target)
    stderr_console().print(f"plot written to {target}")


def register(app: typer.Typer) -> None:
    app.command("plot")(plot_cmd)
