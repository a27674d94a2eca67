"""The coordinator's registry of joined workers, and the spec their measured figures make.

Workers register with ``POST /noodle/cluster/join`` (validated by :class:`JoinRequest`)
and keep their record fresh with heartbeats; :class:`ClusterRegistry` holds one frozen
:class:`WorkerRecord` per node id, thread-safe. A node whose last heartbeat is older
than ``heartbeat_timeout_s`` is *dead* (:meth:`ClusterRegistry.reap`); it joins again by
sending a new join.

:func:`cluster_spec` turns the live records into a spec (a mapping for
:func:`noodle.spec.parse_spec`, the same document ``noodle cluster export`` prints). Each
joined worker reports its own unit costs (:class:`CostReport`, format
``noodle.unit-costs/1``: the model's units timed on its device by the profiler engine); the
registry keeps them as the node's :class:`~noodle.types.NodeProfile` and the spec carries it
as the node's inline ``profile:``, so the planner prices every (node, unit) pair with
:class:`~noodle.graph.pernode.PerNodeCostModel` (no ``compute_score``). The profile is
corrected by what the served stages measured (:func:`corrected`, fed by
:mod:`noodle.serve.drift`): a factor per (node, unit range) the node ran.
``memory_gb`` is the free memory the worker reported at its last heartbeat. The document is
written by :func:`noodle.cluster.export_spec` (the shared exporter), from
:class:`noodle.cluster.NodeRecord` values.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from noodle.cluster import LinkMeasurement
from noodle.graph.pernode import profile_decode_ms
from noodle.serve.links import LinkSample, LinkTable
from noodle.profile.unitcosts import UNIT_COSTS_FORMAT
from noodle.sizes import MAX_UNITS
from noodle.types import NodeProfile, Unit

__all__ = ["JoinRequest", "Heartbeat", "CostReport", "UnitCostReport", "StepOverheadReport", "WorkerRecord", "ClusterRegistry",
           "cluster_spec", "unit_mismatch", "corrected", "shared_bias", "table_ms", "PLAN_BATCH"]

MAX_WIRE_MS = 1e7  # per unit and step: about 2.8 hours
MAX_WIRE_BYTES = 2**50
MAX_BATCH_SIZES = 16
PLAN_BATCH = 1  # sequences per group of a groups-priced cluster plan (noodle serve --cluster --batching groups)


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)


class DeviceReport(_Wire):
    kind: str = Field(min_length=1, max_length=32)
    name: str = Field("", max_length=200)
    total_memory_bytes: int = Field(gt=0)
    free_memory_bytes: int = Field(ge=0)
    threads: int = Field(ge=1, le=100_000)


class UnitCostReport(_Wire):
    """One placement unit timed on the worker: decode ms per batch size, prefill ms per token, bytes."""

    name: str = Field(min_length=1, max_length=200)
    decode_ms: dict[Annotated[int, Field(ge=1, le=2**16)], Annotated[float, Field(gt=0, le=MAX_WIRE_MS)]] = Field(
        min_length=1, max_length=MAX_BATCH_SIZES)
    prefill_ms_per_token: float = Field(gt=0, le=MAX_WIRE_MS)
    param_bytes: int = Field(ge=0, le=MAX_WIRE_BYTES)
    kv_bytes_per_token: int = Field(ge=0, le=MAX_WIRE_BYTES)


class StepOverheadReport(_Wire):
    """The stage runner's fixed work per step that the unit table misses (:func:`~noodle.profile.unitcosts.measure_step_overhead`)."""

    decode_ms: float = Field(ge=0, le=MAX_WIRE_MS)
    prefill_ms: float = Field(ge=0, le=MAX_WIRE_MS)


class CostReport(_Wire):
    """The model's units timed on the worker's own device (:func:`~noodle.profile.unitcosts.measure_unit_costs`).

    ``step_overhead_ms`` is absent in reports of workers from before it was measured: their stages cost no overhead.
    """

    format: Literal["noodle.unit-costs/1"]
    batch_size: int = Field(ge=1, le=2**16)
    prompt_tokens: int = Field(ge=1, le=2**24)
    dtype: str = Field("float32", max_length=32)
    cached: bool = False
    units: list[UnitCostReport] = Field(min_length=1, max_length=MAX_UNITS)
    step_overhead_ms: StepOverheadReport | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_whole_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and "units" not in data and "decode_ms" in data:
            raise ValueError("this worker reports one whole-model decode time (an older noodle worker); the "
                             f"coordinator needs per-unit costs ({UNIT_COSTS_FORMAT}): upgrade noodle on the worker")
        return data

    @model_validator(mode="after")
    def _same_batches(self) -> CostReport:
        sizes = sorted(self.units[0].decode_ms)
        if self.batch_size not in sizes:
            raise ValueError(f"batch_size {self.batch_size} has no decode_ms in units[0] (it has {sizes})")
        for i, u in enumerate(self.units):
            if sorted(u.decode_ms) != sizes:
                raise ValueError(f"units[{i}].decode_ms: batch sizes {sorted(u.decode_ms)} differ from units[0]'s {sizes}")
        return self

    def profile(self, source: str) -> NodeProfile:
        """The report as a :class:`~noodle.types.NodeProfile` (chain order as sent)."""
        b = self.batch_size
        others = sorted(k for k in self.units[0].decode_ms if k != b)
        return NodeProfile(
            unit_names=tuple(u.name for u in self.units), latency_ms=tuple(u.decode_ms[b] for u in self.units),
            batch_size=b, decode_ms=tuple((k, tuple(u.decode_ms[k] for u in self.units)) for k in others),
            param_bytes=tuple(u.param_bytes for u in self.units),
            kv_bytes_per_token=tuple(u.kv_bytes_per_token for u in self.units),
            prefill_ms_per_token=tuple(u.prefill_ms_per_token for u in self.units), source=source,
            step_overhead_ms=self.step_overhead_ms.decode_ms if self.step_overhead_ms else 0.0,
            prefill_overhead_ms=self.step_overhead_ms.prefill_ms if self.step_overhead_ms else None,
        )  # fmt: skip


def unit_mismatch(report: CostReport, names: list[str] | tuple[str, ...]) -> str | None:
    """Words for how ``report``'s units differ from the model's ``names``; None when they agree."""
    if len(report.units) != len(names):
        return f"{len(report.units)} units measured, the coordinator's model has {len(names)}"
    for i, (u, name) in enumerate(zip(report.units, names)):
        if u.name != name:
            return f"units[{i}].name is {u.name!r}, the coordinator's model has {name!r} there"
    return None


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
    profile: NodeProfile  # the model's units timed on this worker
    measured_prompt_tokens: int
    dtype: str
    cached: bool
    joined_at: float
    last_heartbeat: float
    load: float = 0.0
    alive: bool = True
    corrections: tuple[tuple[int, int, float], ...] = ()  # (start, end, measured / table), oldest first

    @property
    def decode_ms(self) -> float:
        """The whole model's decode step as joined (the sum of its units), for display."""
        return float(sum(self.profile.latency_ms))

    @property
    def prefill_ms_per_token(self) -> float:
        return float(sum(self.profile.prefill_ms_per_token or ()))

    @property
    def correction(self) -> float:
        """The node's latest correction factor (1.0 before any stage ran on it)."""
        return self.corrections[-1][2] if self.corrections else 1.0

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        d = dict(self.__dict__)
        del d["profile"]
        d["units"] = len(self.profile.unit_names)
        d["corrections"] = [{"start": a, "end": b, "factor": f} for a, b, f in self.corrections]
        d["correction"] = self.correction
        d["decode_ms"], d["prefill_ms_per_token"] = self.decode_ms, self.prefill_ms_per_token
        d["heartbeat_age_s"] = (now or time.time()) - self.last_heartbeat
        return d


class ClusterRegistry:
    """Thread-safe: joined workers by id, with their last heartbeat (wall-clock seconds)."""

    def __init__(self, *, heartbeat_s: float = 1.0, heartbeat_timeout_s: float = 5.0, model_hash: str = "",
                 unit_names: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.model_hash = model_hash
        self.unit_names = tuple(unit_names)  # the served model's units (empty: not checked)
        self._lock = threading.Lock()
        self._nodes: dict[str, WorkerRecord] = {}
        self.version = 0  # bumps on every join, death and material link change: the controller re-plans on a change
        self._changes: list[str] = []  # what bumped it since the controller last took them
        self.changed = threading.Event()
        self.links = LinkTable()  # measured by noodle.serve.linkprobe

    def join(self, req: JoinRequest) -> WorkerRecord:
        now = time.time()
        prof = req.costs.profile("measured on join")
        rec = WorkerRecord(
            id=req.id, address=req.address, device_kind=req.device.kind, device_name=req.device.name,
            total_memory_bytes=req.device.total_memory_bytes, free_memory_bytes=req.device.free_memory_bytes,
            threads=req.device.threads, profile=prof, measured_prompt_tokens=req.costs.prompt_tokens,
            dtype=req.costs.dtype, cached=req.costs.cached, joined_at=now, last_heartbeat=now,
        )  # fmt: skip
        with self._lock:
            self._nodes[req.id] = rec
            self._bump(f"{req.id} joined")
        self.changed.set()
        return rec

    def _bump(self, what: str) -> None:
        """One change (under the lock): the version moves and ``what`` is kept for the re-plan's reason."""
        self.version += 1
        self._changes = [*self._changes, what][-32:]

    def take_changes(self) -> list[str]:
        """What changed since the last call (joins, deaths, links), oldest first; clears the list."""
        with self._lock:
            out, self._changes = self._changes, []
        return out

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
            for nid in dead:
                self._bump(f"{nid} died")
        if dead:
            self.changed.set()
        return dead

    def mark_dead(self, node_id: str) -> None:
        with self._lock:
            rec = self._nodes.get(node_id)
            if rec is not None and rec.alive:
                self._nodes[node_id] = replace(rec, alive=False)
                self._bump(f"{node_id} died")
        self.changed.set()

    def correct(self, node_id: str, start: int, end: int, factor: float) -> None:
        """Set the node's correction of units ``[start, end)`` (the most recent one last)."""
        with self._lock:
            rec = self._nodes.get(node_id)
            if rec is not None:
                kept = tuple(c for c in rec.corrections if (c[0], c[1]) != (start, end))[-15:]
                self._nodes[node_id] = replace(rec, corrections=(*kept, (start, end, float(factor))))

    def factors(self) -> dict[tuple[str, int, int], float]:
        """Every correction as ``{(node, start, end): factor}``."""
        return {(r.id, a, b): f for r in self.records() for a, b, f in r.corrections}

    def record_link(self, sample: LinkSample) -> bool:
        """Store a link probe's result; a new or materially changed link bumps the version (the controller
        weighs a re-plan). Returns whether it did."""
        material = self.links.record(sample)
        if material:
            with self._lock:
                self._bump(f"link {sample.source}->{sample.target} measured")
            self.changed.set()
        return material

    def records(self, *, alive_only: bool = False) -> list[WorkerRecord]:
        with self._lock:
            recs = list(self._nodes.values())
        return [r for r in recs if r.alive] if alive_only else recs

    def alive_count(self) -> int:
        return len(self.records(alive_only=True))


def corrected(prof: NodeProfile, corrections: tuple[tuple[int, int, float], ...], prior: float | None = None) -> NodeProfile:
    """``prof`` with its decode and prefill times multiplied by the measured corrections.

    The step overheads take the node's most recent factor (its stage's). A unit inside a corrected range takes that range's factor (the most recent range holding it);
    the node's other units take its most recent factor (a node that runs slower than its table
    on one range is likely to on the others). A node with no correction of its own takes ``prior``
    (what its peers of the same device kind measured: the tables' shared bias, e.g. the per-step
    cost the hook-timed units miss), else stays as it is.
    """
    if not corrections:
        if prior is None:
            return prof
        corrections = ((0, len(prof.unit_names), prior),)
    n = len(prof.unit_names)
    f = [corrections[-1][2]] * n
    for start, end, factor in corrections:
        for i in range(max(0, start), min(n, end)):
            f[i] = factor

    def times(col: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(x * k for x, k in zip(col, f))

    last = corrections[-1][2]
    return replace(prof, latency_ms=times(prof.latency_ms), decode_ms=tuple((b, times(ms)) for b, ms in prof.decode_ms),
                   prefill_ms_per_token=None if prof.prefill_ms_per_token is None else times(prof.prefill_ms_per_token),
                   step_overhead_ms=prof.step_overhead_ms * last,
                   prefill_overhead_ms=None if prof.prefill_overhead_ms is None else prof.prefill_overhead_ms * last)  # fmt: skip


SHARED_BIAS_MAX = 1.5  # a correction within [1/1.5, 1.5] may be the tables' common bias; beyond, a node's own trouble


def shared_bias(records: list[WorkerRecord]) -> dict[str, float]:
    """Per device kind, the smallest latest correction among the nodes of that kind, when it is moderate.

    A node that has not served yet is priced with its peers' bias rather than its raw table: otherwise
    an unmeasured node always looks faster than a measured one whose table missed a cost they share
    (e.g. per-step work the hook-timed units do not see), and stages would hop onto it for nothing.
    The smallest factor is the part every serving node showed. Only a moderate factor (within
    ``SHARED_BIAS_MAX`` of 1) is taken as shared: a node 4x off its table is throttled or was described
    wrongly, and spreading that to its peers would keep the plan on it.
    """
    latest: dict[str, float] = {}
    for r in records:
        if r.corrections:
            f = r.corrections[-1][2]
            latest[r.device_kind] = min(f, latest.get(r.device_kind, f))
    return {kind: f for kind, f in latest.items() if 1 / SHARED_BIAS_MAX <= f <= SHARED_BIAS_MAX}


def table_ms(rec: WorkerRecord, start: int, end: int, batch_size: int = PLAN_BATCH,
             units: Sequence[Unit] | None = None) -> float:  # fmt: skip
    """The node's join-time (uncorrected) decode cost of units ``[start, end)`` at ``batch_size`` plus its step overhead,
    as the planner prices it (:func:`~noodle.graph.pernode.profile_decode_ms`; along the ``units``' batch curves)."""
    per_unit = profile_decode_ms(rec.profile, units, batch_size) if units else rec.profile.decode_latency_ms(batch_size)
    return float(sum(per_unit[start:end])) + rec.profile.step_overhead_ms


def cluster_spec(records: list[WorkerRecord], model_dir: Path, *, concurrency: int = 8, continuous: bool = False,
                 name: str | None = None, time_limit_s: float = 5.0,
                 links: Mapping[str, tuple[LinkMeasurement, ...]] | None = None) -> dict[str, Any]:  # fmt: skip
    """A spec (mapping) for ``records`` serving ``model_dir``: each node's memory, its measured unit costs and links.

    The workload is the model's context (3/4 prompt, 1/4 new tokens) with ``concurrency`` sequences in flight,
    as ``noodle serve`` runs them: ``continuous`` (its engine batches every running sequence per step) as
    ``streams = concurrency``, else one sequence per group and ``concurrency`` groups. ``hf_config`` is the absolute path
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
    nodes = []
    priors = shared_bias(records)
    for r in sorted(records, key=lambda r: r.id):
        nodes.append(NodeRecord(id=r.id, address=r.address, device=r.device_kind, device_name=r.device_name,
                                total_memory_bytes=r.total_memory_bytes, free_memory_bytes=max(r.free_memory_bytes, 2**20),
                                torch_threads=r.threads, costs=corrected(r.profile, r.corrections, priors.get(r.device_kind))))  # fmt: skip
    if links:
        nodes = [replace(n, links=tuple(links.get(n.id, ()))) for n in nodes]
    sizes = {"streams": concurrency} if continuous else {"batch_size": PLAN_BATCH, "concurrency": concurrency}
    workload = Workload(prompt_tokens=prompt, max_new_tokens=max(1, positions - prompt), **sizes)
    doc = export_spec(nodes, {"hf_config": str(model_dir / "config.json")}, workload,
                      name=name or f"cluster-{model_dir.name}")  # fmt: skip
    doc["solver"] = {"name": "auto", "time_limit_s": time_limit_s}
    return doc
