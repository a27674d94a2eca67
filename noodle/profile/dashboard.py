"""The profile dashboard: a self-contained Plotly page and a matplotlib PNG summary.

``dashboard.html`` embeds plotly.js (no network needed) and shows five charts:
latency per unit, the memory timeline of the traced iteration, parameters vs
latency, a layer-type comparison and the bottleneck table. ``summary.png`` shows
the first four as static plots.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from noodle.profile.report import ProfileReport

__all__ = ["write_dashboard", "dashboard_figures", "layer_types"]

_MB = 1024.0**2


def layer_types(report: ProfileReport, phase: str) -> dict[str, float]:
    """Milliseconds per forward by leaf-module class, or by unit class without module rows."""
    by_type = report.summary["phases"][phase].get("leaf_ms_by_type") or {}
    if by_type:
        return dict(by_type)
    out: dict[str, float] = {}
    for r in report.rows_of("unit", phase):
        if r["count"]:
            out[r["module_type"]] = out.get(r["module_type"], 0.0) + r["latency_ms_mean"]
    return out


def _unit_series(report: ProfileReport, phase: str) -> list[dict[str, Any]]:
    return [r for r in report.rows_of("unit", phase) if r["count"]]


def dashboard_figures(report: ProfileReport) -> list[tuple[str, Any]]:
    """(title, plotly figure) for each chart of the dashboard, in page order."""
    import plotly.graph_objects as go

    decode = _unit_series(report, "decode")
    prefill = _unit_series(report, "prefill")
    prompt = report.summary["workload"]["prompt_tokens"]
    figs: list[tuple[str, Any]] = []

    lat = go.Figure()
    lat.add_bar(
        name="decode step p50 (ms)",
        x=[r["name"] for r in decode],
        y=[r["latency_ms_p50"] for r in decode],
        error_y={"type": "data", "symmetric": False,
                 "array": [r["latency_ms_p95"] - r["latency_ms_p50"] for r in decode],
                 "arrayminus": [0.0] * len(decode)},
    )
    lat.add_bar(
        name="prefill p50 per prompt token (ms)",
        x=[r["name"] for r in prefill],
        y=[r["latency_ms_p50"] / prompt for r in prefill],
    )
    lat.update_layout(barmode="group", xaxis_title="placement unit", yaxis_title="ms",
                      legend={"orientation": "h", "y": -0.25})
    figs.append(("Latency per unit (decode p50, whisker to p95; prefill per token)", lat))

    mem = go.Figure()
    events = report.rows_of("memory")
    for phase in ("prefill", "decode"):
        pts = [e for e in events if e["phase"] == phase]
        mem.add_scatter(
            name=phase, mode="lines+markers", x=[e["seq"] for e in pts], y=[e["memory_bytes"] / _MB for e in pts],
            text=[f"{e['unit']} (step {e['step']})" for e in pts], hovertemplate="%{text}<br>%{y:.1f} MiB",
        )
    mem.update_layout(xaxis_title="unit exit, in call order (one traced iteration)", yaxis_title="MiB")
    figs.append((f"Memory timeline ({report.summary['memory_source']})", mem))

    scatter = go.Figure()
    groups = {"embed": ["embed"], "decoder blocks": [r["name"] for r in decode if r["name"].startswith("block.")],
              "lm_head": ["lm_head"]}
    for label, members in groups.items():
        pts = [r for r in decode if r["name"] in members]
        scatter.add_scatter(
            name=label, mode="markers" if len(pts) > 1 else "markers+text", textposition="top center",
            x=[r["num_parameters"] / 1e6 for r in pts], y=[r["latency_ms_p50"] for r in pts],
            text=[r["name"] for r in pts], marker={"size": 11}, hovertemplate="%{text}: %{x:.2f}M params, %{y:.3f} ms",
        )
    scatter.update_layout(xaxis_title="parameters (millions)", yaxis_title="decode step p50 (ms)")
    figs.append(("Parameters vs decode latency", scatter))

    types = go.Figure()
    for phase in ("prefill", "decode"):
        data = layer_types(report, phase)
        types.add_bar(name=phase, x=list(data), y=list(data.values()))
    types.update_layout(barmode="group", yaxis_title="ms per forward (sum over modules of the type)")
    source = report.summary.get("module_breakdown") or "placement units"
    figs.append((f"Layer-type comparison ({source})", types))

    share = {b["name"]: b["share"] for b in report.summary["phases"]["decode"]["bottlenecks"]}
    total = sum(r["latency_ms_p50"] for r in decode) or 1.0
    ranked = sorted(decode, key=lambda r: -r["latency_ms_p50"])
    pre = {r["name"]: r["latency_ms_p50"] / prompt for r in prefill}
    table = go.Figure(
        go.Table(
            header={"values": ["rank", "unit", "type", "decode p50 ms", "decode p95 ms", "share of decode",
                               "prefill ms/token", "params (M)", "top-3"]},
            cells={"values": [
                list(range(1, len(ranked) + 1)),
                [r["name"] for r in ranked],
                [r["module_type"] for r in ranked],
                [f"{r['latency_ms_p50']:.3f}" for r in ranked],
                [f"{r['latency_ms_p95']:.3f}" for r in ranked],
                [f"{100 * r['latency_ms_p50'] / total:.1f}%" for r in ranked],
                [f"{pre.get(r['name'], float('nan')):.4f}" for r in ranked],
                [f"{r['num_parameters'] / 1e6:.2f}" for r in ranked],
                ["yes" if r["name"] in share else "" for r in ranked],
            ]},
        )
    )
    table.update_layout(height=max(300, 32 * len(ranked) + 80))
    figs.append(("Bottlenecks (units ranked by decode-step latency)", table))
    return figs


def _header_html(report: ProfileReport, title: str) -> str:
    s = report.summary
    cov = s["coverage"]
    wl = s["workload"]
    dec = s["phases"]["decode"]
    tops = ", ".join(f"{b['name']} ({100 * b['share']:.1f}%)" for b in s["bottlenecks"])
    items = [
        ("model", s["model"]),
        ("reference device", s["reference_device"]["description"]),
        ("workload", f"prompt {wl['prompt_tokens']} tokens, {wl['decode_tokens']} decode steps, batch {wl['batch_size']}"),
        ("iterations", f"{s['iterations']} profiled ({s['strategy']} hooks; timer: {s['timer']})"),
        ("decode forward", f"p50 {dec['forward_ms_p50']:.3f} ms; units account for {100 * (dec['attributed_share'] or 0):.1f}%"),
        ("top-3 decode bottlenecks", tops),
        ("coverage", f"units {cov['units']['measured']}/{cov['units']['total']} ({cov['units']['percent']}%), "
                     f"leaf modules {cov['leaf_modules']['timed']}/{cov['leaf_modules']['total']} "
                     f"({cov['leaf_modules']['percent']}%)"),
        ("memory", s["memory_source"]),
    ]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items)
    return f"<h1>{html.escape(title)}</h1><table class='meta'>{rows}</table>"


def write_dashboard(report: ProfileReport, folder: str | Path, title: str) -> dict[str, Path]:
    """Write ``dashboard.html`` and ``summary.png`` into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, (name, fig) in enumerate(dashboard_figures(report)):
        fig.update_layout(title=name, template="plotly_white", margin={"t": 60, "l": 60, "r": 30, "b": 60})
        body = fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"chart{i}")
        parts.append(f"<section>{body}</section>")
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:24px;max-width:1300px}"
        "table.meta th{text-align:left;padding-right:16px;vertical-align:top}"
        "section{margin:18px 0;border-top:1px solid #ddd}"
        "</style></head><body>"
        + _header_html(report, title)
        + "".join(parts)
        + "</body></html>"
    )
    html_path = folder / "dashboard.html"
    html_path.write_text(page, encoding="utf-8")
    png_path = _write_png(report, folder / "summary.png", title)
    return {"html": html_path, "png": png_path}


def _write_png(report: ProfileReport, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = _unit_series(report, "decode")
    prompt = report.summary["workload"]["prompt_tokens"]
    prefill = {r["name"]: r["latency_ms_p50"] / prompt for r in _unit_series(report, "prefill")}
    names = [r["name"] for r in decode]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    ax = axes[0][0]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [r["latency_ms_p50"] for r in decode], width=0.4, label="decode step p50")
    ax.bar([x + 0.2 for x in xs], [prefill.get(n, 0.0) for n in names], width=0.4, label="prefill per token p50")
    ax.set_xticks(list(xs), names, rotation=60, fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("Latency per unit")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    events = report.rows_of("memory")
    for phase in ("prefill", "decode"):
        pts = [e for e in events if e["phase"] == phase]
        ax.plot([e["seq"] for e in pts], [e["memory_bytes"] / _MB for e in pts], marker=".", label=phase)
    ax.set_xlabel("unit exit (traced iteration)")
    ax.set_ylabel("MiB")
    ax.set_title("Memory timeline")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    ax.scatter([r["num_parameters"] / 1e6 for r in decode], [r["latency_ms_p50"] for r in decode])
    for r in decode:
        ax.annotate(r["name"], (r["num_parameters"] / 1e6, r["latency_ms_p50"]), fontsize=7)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("decode step p50 (ms)")
    ax.set_title("Parameters vs latency")

    ax = axes[1][1]
    types = layer_types(report, "decode")
    ax.barh(list(types)[::-1], list(types.values())[::-1])
    ax.set_xlabel("ms per decode forward")
    ax.set_title("Layer types (decode)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
