"""The coordinator's registry of joined workers, and the spec their measured figures make.

Workers register with ``POST /noodle/cluster/join`` (validated by :class:`JoinRequest`)
and keep their record fresh with heartbeats; :class:`ClusterRegistry` holds one frozen
:class:`WorkerRecord` per node id, thread-safe. A node whose last heartbeat is older
than ``heartbeat_timeout_s`` is *dead* (:meth:`ClusterRegistry.reap`); it joins again by
sending a new join.

:func:`cluster_spec` turns the live records into a spec (a mapping for
:func:`noodle.spec.parse_spec`, the same document ``noodle cluster export`` prints).
Until per-node unit costs are in the planner, a node's ``compute_score`` is derived
from its measurement: the model's analytic decode step at batch 1 (the same prompt
length the worker timed) on the default reference device, divided by the decode step
the worker measured. So ``compute_score`` 2.0 means "this node ran the whole model's
decode step twice as fast as the analytic reference predicts", and the planner's
per-stage costs scale from the analytic profile by that factor, divided by the node's drift
factor (how much slower its stages have run than when they started). ``memory_gb`` is the
free memory the worker reported at its last heartbeat. The document is written by
:func:`noodle.cluster.export_spec` (the shared exporter), from :class:`noodle.cluster.NodeRecord` values.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from noodle.cluster import LinkMeasurement
from noodle.serve.links import LinkSample, LinkTable
from noodle.spec import MAX_SCORE, MIN_SCORE

__all__ = ["JoinRequest", "Heartbeat", "WorkerRecord", "ClusterRegistry", "cluster_spec", "analytic_decode_ms"]


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)


class DeviceReport(_Wire):
    kind: str = Field(min_length=1, max_length=32)
    name: str = Field("", max_length=200)
    total_memory_bytes: int = Field(gt=0)
    free_memory_bytes: int = Field(ge=0)
    threads: int = Field(ge=1, le=100_000)


class CostReport(_Wire):
    decode_ms: float = Field(gt=0, le=1e7)
    prefill_ms_per_token: float = Field(gt=0, le=1e7)
    prompt_tokens: int = Field(ge=1, le=2**24)
    batch: int = Field(1, ge=1, le=2**16)
    dtype: str = "float32"
    cached: bool = False


class JoinRequest(_Wire):
    """What a joining worker sends."""

    id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.@:-]+$")
    address: str = Field(min_length=3, max_length=300, pattern=r"^[^\s/]+:\d{1,5}$")
    device: DeviceReport
    model_hash: str = Field(min_length=1, max_length=64)
    costs: CostReport


class Heartbeat(_Wire):
    id: str = Field(min_length=1, max_length=100)
    load: float = Field(0.0, ge=0, le=1e6)
    free_memory_bytes: int = Field(ge=0)


@dataclass(frozen=True)
class WorkerRecord:
    """One joined worker as the coordinator knows it."""

    id: str
    address: str
    device_kind: str
    device_name: str
    total_memory_bytes: int
    free_memory_bytes: int
    threads: int
    decode_ms: float
    prefill_ms_per_token: float
    measured_prompt_tokens: int
    dtype: str
    cached: bool
    joined_at: float
    last_heartbeat: float
    load: float = 0.0
    alive: bool = True
    drift: float = 1.0  # measured slowdown since it joined (from the served stages' step times)

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["heartbeat_age_s"] = (now or time.time()) - self.last_heartbeat
        return d


class ClusterRegistry:
    """Thread-safe: joined workers by id, with their last heartbeat (wall-clock seconds)."""

    def __init__(self, *, heartbeat_s: float = 1.0, heartbeat_timeout_s: float = 5.0, model_hash: str = "") -> None:
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.model_hash = model_hash
        self._lock = threading.Lock()
        self._nodes: dict[str, WorkerRecord] = {}
        self.version = 0  # bumps on every join and death: the controller re-plans on a change
        self.changed = threading.Event()
        self.links = LinkTable()  # measured by noodle.serve.linkprobe

    def join(self, req: JoinRequest) -> WorkerRecord:
        now = time.time()
        rec = WorkerRecord(
            id=req.id, address=req.address, device_kind=req.device.kind, device_name=req.device.name,
            total_memory_bytes=req.device.total_memory_bytes, free_memory_bytes=req.device.free_memory_bytes,
            threads=req.device.threads, decode_ms=req.costs.decode_ms,
            prefill_ms_per_token=req.costs.prefill_ms_per_token, measured_prompt_tokens=req.costs.prompt_tokens,
            dtype=req.costs.dtype, cached=req.costs.cached, joined_at=now, last_heartbeat=now,
        )  # fmt: skip
        with self._lock:
            self._nodes[req.id] = rec
            self.version += 1
        self.changed.set()
        return rec

    def heartbeat(self, hb: Heartbeat) -> bool:
        """Refresh a node; False when it is unknown or was declared dead (it must join again)."""
        with self._lock:
            rec = self._nodes.get(hb.id)
            if rec is None or not rec.alive:
                return False
            self._nodes[hb.id] = replace(rec, last_heartbeat=time.time(), load=hb.load,
                                         free_memory_bytes=hb.free_memory_bytes)  # fmt: skip
            return True

    def reap(self, now: float | None = None) -> list[str]:
        """Mark nodes silent for ``heartbeat_timeout_s`` dead; returns the ids that died now."""
        now = now or time.time()
        dead = []
        with self._lock:
            for nid, rec in self._nodes.items():
                if rec.alive and now - rec.last_heartbeat > self.heartbeat_timeout_s:
                    self._nodes[nid] = replace(rec, alive=False)
                    dead.append(nid)
            if dead:
                self.version += 1
        if dead:
            self.changed.set()
        return dead

    def mark_dead(self, node_id: str) -> None:
        with self._lock:
            rec = self._nodes.get(node_id)
            if rec is not None and rec.alive:
                self._nodes[node_id] = replace(rec, alive=False)
                self.version += 1
        self.changed.set()

    def scale(self, node_id: str, factor: float) -> None:
        """Multiply a node's drift factor (its decode time in the spec) by ``factor``."""
        with self._lock:
            rec = self._nodes.get(node_id)
            if rec is not None:
                self._nodes[node_id] = replace(rec, drift=rec.drift * factor)

    def record_link(self, sample: LinkSample) -> bool:
        """Store a link probe's result; a new or materially changed link bumps the version (the controller
        weighs a re-plan). Returns whether it did."""
        material = self.links.record(sample)
        if material:
            with self._lock:
                self.version += 1
            self.changed.set()
        return material

    def records(self, *, alive_only: bool = False) -> list[WorkerRecord]:
        with self._lock:
            recs = list(self._nodes.values())
        return [r for r in recs if r.alive] if alive_only else recs

    def alive_count(self) -> int:
        return len(self.records(alive_only=True))


def analytic_decode_ms(model_dir: Path, prompt_tokens: int, dtype: str | None = None) -> float:
    """The whole model's decode step at batch 1 with ``prompt_tokens`` of context, analytic, on the default reference."""
    from noodle.executors.slicing import read_config
    from noodle.graph.analytic import analytic_units
    from noodle.types import Workload

    config = read_config(model_dir)
    units = analytic_units(config, Workload(prompt_tokens=prompt_tokens, max_new_tokens=1, batch_size=1), dtype=dtype).units
    return float(sum(u.latency_ms for u in units))


def cluster_spec(records: list[WorkerRecord], model_dir: Path, *, concurrency: int = 8,
                 name: str | None = None, time_limit_s: float = 5.0,
                 links: Mapping[str, tuple[LinkMeasurement, ...]] | None = None) -> dict[str, Any]:  # fmt: skip
    """A spec (mapping) for ``records`` serving ``model_dir``: each node's memory and its measured speed.

    The workload is the model's context (3/4 prompt, 1/4 new tokens), one sequence per group and
    ``concurrency`` groups in flight, as ``noodle serve`` runs it. ``hf_config`` is the absolute path
    of the model's config, so the document solves from any folder. ``links``: what each node measured
    to its peers (:meth:`LinkTable.measurements`), written to ``links.pairs``.
    """
    from noodle.executors.kvbudget import max_positions
    from noodle.executors.slicing import read_config

    from noodle.cluster import NodeRecord, export_spec
    from noodle.types import Workload

    model_dir = Path(model_dir).resolve()
    config = read_config(model_dir)
    positions = max_positions(config) or 2048
    prompt = max(1, positions * 3 // 4)
    reference: dict[int, float] = {}
    nodes = []
    for r in sorted(records, key=lambda r: r.id):
        ref = reference.get(r.measured_prompt_tokens)
        if ref is None:
            ref = reference[r.measured_prompt_tokens] = analytic_decode_ms(model_dir, r.measured_prompt_tokens)
        score = min(MAX_SCORE, max(MIN_SCORE, ref / (r.decode_ms * r.drift)))
        nodes.append(NodeRecord(id=r.id, address=r.address, device=r.device_kind, device_name=r.device_name,
                                total_memory_bytes=r.total_memory_bytes, free_memory_bytes=max(r.free_memory_bytes, 2**20),
                                torch_threads=r.threads, compute_score=round(score, 6)))  # fmt: skip
    if links:
        nodes = [replace(n, links=tuple(links.get(n.id, ()))) for n in nodes]
    workload = Workload(prompt_tokens=prompt, max_new_tokens=max(1, positions - prompt), batch_size=1,
                        concurrency=concurrency)  # fmt: skip
    doc = export_spec(nodes, {"hf_config": str(model_dir / "config.json")}, workload,
                      name=name or f"cluster-{model_dir.name}")  # fmt: skip
    doc["solver"] = {"name": "auto", "time_limit_s": time_limit_s}
    return doc
