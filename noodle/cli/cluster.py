"""``noodle cluster status|export --url URL``: what a ``noodle serve --cluster`` coordinator knows.

``status`` prints a table of the joined workers (device, memory, measured decode time of the
whole model, last heartbeat, the stages each runs), the links the coordinator measured and the
re-plans so far; ``export`` prints
the spec the measured figures make (``noodle cluster export --url URL > cluster.yaml``, then
``noodle solve cluster.yaml``); ``--links relay`` prices each hop through the coordinator, as the
grpc executor of ``noodle serve --cluster`` runs it (default ``direct``: worker to worker).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import typer
from rich.table import Table

from noodle.cli.output import stdout_console
from noodle.errors import ExecutorError, SpecError

__all__ = ["register", "fetch"]

MAX_REPLY_BYTES = 64 << 20  # a coordinator's status or exported spec; more is cut off

_TOKEN_HELP = "the coordinator's cluster token or its --api-key (it shows worker addresses and paths only to them)"
cluster_app = typer.Typer(help="Workers that joined a `noodle serve --cluster` coordinator.", no_args_is_help=True)


@dataclass(frozen=True)
class _Reply:
    status_code: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def fetch(url: str, path: str, timeout_s: float = 10.0, token: str | None = None) -> _Reply:
    """GET ``url + path`` (with ``token`` as the bearer); one clear error when the coordinator cannot be reached or refuses.

    Uses the standard library's HTTP client, so a planning-only install talks to a coordinator too.
    """
    if not url.startswith(("http://", "https://")):
        raise SpecError(f"--url: {url!r} is not an http(s) URL, e.g. http://127.0.0.1:8000")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + path, headers=headers),
                                    timeout=timeout_s) as resp:  # fmt: skip
            reply = _Reply(resp.status, resp.read(MAX_REPLY_BYTES).decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:
        reply = _Reply(exc.code, exc.read(MAX_REPLY_BYTES).decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ExecutorError(f"--url: cannot reach {url} ({type(exc).__name__}: {reason}); is `noodle serve --cluster` "
                            "running?") from None  # fmt: skip
    if reply.status_code == 401:
        raise ExecutorError(f"--token: {url} refused it (401); give the coordinator's --token or --api-key "
                            "(or set NOODLE_TOKEN)")  # fmt: skip
    if reply.status_code == 404:
        raise ExecutorError(f"--url: {url} has no cluster (404); start it with `noodle serve --cluster`")
    if reply.status_code >= 400:
        try:
            msg = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = reply.text[:200]
        raise ExecutorError(f"--url: {url}{path}: {reply.status_code}: {msg}")
    return reply


@cluster_app.command("status")
def status_cmd(url: str = typer.Option("http://127.0.0.1:8000", "--url", help="the coordinator (noodle serve --cluster)"),
               json_out: bool = typer.Option(False, "--json", help="print the raw JSON"),
               token: str | None = typer.Option(None, "--token", envvar="NOODLE_TOKEN", help=_TOKEN_HELP)) -> None:  # fmt: skip
    """Joined workers: device, memory, measured speed, health and the stages each runs."""
    data = fetch(url, "/noodle/cluster", token=token).json()
    if json_out:
        import json

        print(json.dumps(data, indent=1))
        return
    con = stdout_console()
    table = Table(title=f"cluster at {url}: plan {data['plan']} ({data['predicted_tps']:.1f} tokens/s predicted)")
    for col in ("node", "address", "device", "memory free/total GiB", "decode ms", "prefill ms/token", "health",
                "last heartbeat", "stages"):  # fmt: skip
        table.add_column(col, justify="right" if "ms" in col or "GiB" in col else "left")
    for n in data["nodes"]:
        health = "alive" if n["alive"] else "dead"
        table.add_row(n["id"], n["address"], f"{n['device_kind']} ({n['device_name']})",
                      f"{n['free_memory_bytes'] / 2**30:.1f}/{n['total_memory_bytes'] / 2**30:.1f}",
                      f"{n['decode_ms']:.2f}", f"{n['prefill_ms_per_token']:.3f}", health,
                      f"{n['heartbeat_age_s']:.1f} s ago", "; ".join(n["stages"]) or "spare")  # fmt: skip
    con.print(table)
    _links_table(con, data.get("links") or [])
    for e in data.get("prediction", []):
        con.print(f"stage {e['stage']} on {e['node']} units {e['units']}: measured {e['measured_ms']:.3f} ms, "
                  f"predicted {e['predicted_ms']:.3f} ms ({e['error_pct']:+.1f} %), corrected estimate "
                  f"{e['corrected_ms']:.3f} ms (x{e['correction']:.2f}, {e['windows']} windows)", highlight=False)  # fmt: skip
    for r in data["replans"]:
        when = time.strftime("%H:%M:%S", time.localtime(r["t"]))
        con.print(f"{when} re-plan ({r['reason']}): {r['before_tps']:.1f} -> {r['after_tps']:.1f} tokens/s, "
                  f"{r['before']} -> {r['after']}, held requests {r['seconds']:.2f} s", highlight=False)  # fmt: skip


def _links_table(con: Any, links: list[dict[str, Any]]) -> None:
    """Measured links (``noodle serve --cluster`` probes them): one row per direction probed."""
    if not links:
        con.print("links: none measured yet (the spec uses its default link)", highlight=False)
        return
    table = Table(title="links measured (latency = half the median round trip)")
    for col in ("from -> to", "latency ms", "round trip ms", "bandwidth Gb/s", "up/down Gb/s", "payload", "age"):
        table.add_column(col, justify="left" if col == "from -> to" else "right")
    for x in links:
        table.add_row(f"{x['source']} -> {x['target']}", f"{x['latency_ms']:.3f}", f"{x['rtt_ms']:.3f}",
                      f"{x['bandwidth_gbps']:.3g}", f"{x['up_gbps']:.3g}/{x['down_gbps']:.3g}",
                      f"{x['bytes'] / 2**10:.0f} KiB", f"{x['age_s']:.0f} s")  # fmt: skip
    con.print(table)


@cluster_app.command("export")
def export_cmd(url: str = typer.Option("http://127.0.0.1:8000", "--url", help="the coordinator (noodle serve --cluster)"),
               links: str = typer.Option("direct", "--links", help="direct: the links the workers measured to each other "
                                         "(what a ring/torchrpc deployment pays); relay: each hop through the "
                                         "coordinator (what the grpc executor of noodle serve --cluster pays)"),
               token: str | None = typer.Option(None, "--token", envvar="NOODLE_TOKEN", help=_TOKEN_HELP)) -> None:
    """Print the spec of the live workers with their measured figures (YAML, for `noodle solve`)."""
    if links not in _LINK_MODES:
        raise SpecError(f"--links: {links!r} is not a links mode; give one of {', '.join(_LINK_MODES)}")
    sys.stdout.write(fetch(url, f"/noodle/cluster/export?links={links}", token=token).text)


_LINK_MODES = ("direct", "relay")  # noodle.serve.links.LINK_MODES, without importing the server


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")
