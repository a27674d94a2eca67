"""What ``noodle exec`` adds for the distributed backends: their options, and the network table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from noodle.errors import SpecError

__all__ = ["backend_options", "render_network"]


def backend_options(
    backend: str,
    *,
    workers: str | None,
    spare: str | None,
    token: str | None,
    tls_ca: Path | None,
    step_timeout: float | None,
) -> dict[str, Any]:
    """Keyword arguments for the executor factory of ``backend`` (``local`` takes none)."""
    opts: dict[str, Any] = {}
    if backend in ("grpc", "torchrpc") and step_timeout is not None:
        if step_timeout <= 0:
            raise SpecError(f"--step-timeout: must be > 0 seconds, got {step_timeout}")
        from noodle.executors.failover import RetryPolicy

        opts["policy"] = RetryPolicy(step_timeout_s=step_timeout)
    if backend == "grpc":
        opts.update(workers=workers or "", spares=spare or "", token=token, tls_ca=tls_ca)
    return opts


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render_network(report: Any, console: Console) -> None:
    """Per-hop bytes, serialization and transit beside the plan's hop time; nothing for ``local``."""
    hops = getattr(report, "hops", ())
    if not hops:
        return
    table = Table(title=f"network ({report.data_path})" if getattr(report, "data_path", "") else "network")
    for col in ("hop", "via", "bytes/step", "bytes total", "serialize ms", "transit ms", "planned hop ms"):
        table.add_column(col, justify="left" if col in ("hop", "via") else "right")
    for h in hops:
        table.add_row(
            h.name, "coordinator" if h.relayed else "direct", _bytes(h.bytes_per_decode), _bytes(h.bytes_total),
            f"{h.serialize_ms_p50:.3f}", f"{h.transit_ms_p50:.3f}",
            "n/a" if h.predicted_hop_ms is None else f"{h.predicted_hop_ms:.3f}",
        )  # fmt: skip
    console.print(table)
    rtts = ", ".join(
        f"{r.peer} {r.rtt_ms_p50:.3f} ms" + (f" (ping {r.ping_ms:.3f})" if r.ping_ms is not None else "")
        for r in report.rtts
    )
    console.print(
        f"network: {report.network_ms_p50:.3f} ms of {report.decode_ms_p50:.3f} ms per decode step "
        f"({report.network_share:.0%}); round trips: {rtts or 'n/a'}"
    )
    for ev in report.failovers:
        console.print(f"failover at step {ev.step}: {ev.node}: {ev.action}: {ev.detail} ({ev.seconds:.2f} s; {ev.reason})")
