"""The coordinator's registry of joined workers, and the spec their measured figures make.

Workers register with ``POST /noodle/cluster/join`` (validated by :class:`JoinRequest`, bounded by
:mod:`noodle.serve.claims`) and keep their record fresh with heartbeats; :class:`ClusterRegistry`
holds one frozen :class:`WorkerRecord` per node id, thread-safe. A join gets a secret that its
heartbeats must carry (a heartbeat speaks only for its own node), and an id held by a live node is
refused. A node joined with ``verified=False`` is not planned until :meth:`ClusterRegistry.verify`
(the coordinator timed a stage on it: :mod:`noodle.serve.verify`). A node whose last heartbeat is
older than ``heartbeat_timeout_s`` is *dead* (:meth:`ClusterRegistry.reap`); it joins again by
sending a new join.

:func:`cluster_spec` turns the live records into a spec (a mapping for
:func:`noodle.spec.parse_spec`, the same document ``noodle cluster export`` prints). Each
joined worker reports its own unit costs (:class:`CostReport`, format
``noodle.unit-costs/1``: the model's units timed on its device by the profiler engine); the
registry keeps them as the node's :class:`~noodle.types.NodeProfile` and the spec carries it
as the node's inline ``profile:``, so the planner prices every (node, unit) pair with
:class:`~noodle.profile.pernode.PerNodeCostModel` (no ``compute_score``). The profile is
corrected by what the served stages measured (:func:`corrected`, fed by
:mod:`noodle.serve.drift`): a factor per (node, unit range) the node ran.
``memory_gb`` is the free memory the worker reported at its last heartbeat. The document is
written by :func:`noodle.cluster.export_spec` (the shared exporter), from
:class:`noodle.cluster.NodeRecord` values.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from noodle.cluster import LinkMeasurement
from noodle.models.card import ModelCard, read_card
from noodle.profile.pernode import profile_decode_ms
from noodle.serve.claims import (ClaimRefused, CostReport, Heartbeat, JoinRequest, StepOverheadReport, UnitCostReport,
                                 unit_mismatch)
from noodle.serve.links import LinkSample, LinkTable
from noodle.sizes import size_problem
from noodle.types import NodeProfile, Unit

__all__ = ["JoinRequest", "Heartbeat", "CostReport", "UnitCostReport", "StepOverheadReport", "WorkerRecord", "ClusterRegistry",
           "cluster_spec", "unit_mismatch", "corrected", "shared_bias", "table_ms", "PLAN_BATCH"]

PLAN_BATCH = 1  # sequences per group of a groups-priced cluster plan (noodle serve --cluster --batching groups)


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
    secret: str = ""  # issued at join; its heartbeats must carry it
    verified: bool = True  # False until its claimed table was timed on it (noodle.serve.verify); only verified nodes are planned
    refused: str = ""  # why the coordinator refused it after it joined (its heartbeats are answered 403 with this)

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
        del d["profile"], d["secret"]
        d["units"] = len(self.profile.unit_names)
        d["corrections"] = [{"start": a, "end": b, "factor": f} for a, b, f in self.corrections]
        d["correction"] = self.correction
        d["decode_ms"], d["prefill_ms_per_token"] = self.decode_ms, self.prefill_ms_per_token
        d["heartbeat_age_s"] = (now or time.time()) - self.last_heartbeat
        return d


class ClusterRegistry:
    """Thread-safe: joined workers by id, with their last heartbeat (wall-clock seconds)."""

    def __init__(self, *, heartbeat_s: float = 1.0, heartbeat_timeout_s: float = 5.0, model_hash: str = "",
                 unit_names: tuple[str, ...] = (), weights_sha256: str = "") -> None:  # fmt: skip
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.model_hash = model_hash
        self.weights_sha256 = weights_sha256  # the served weights' content hash (empty: not checked)
        self.unit_names = tuple(unit_names)  # the served model's units (empty: not checked)
        self._lock = threading.Lock()
        self._nodes: dict[str, WorkerRecord] = {}
        self.version = 0  # bumps on every join, death and material link change: the controller re-plans on a change
        self._changes: list[str] = []  # what bumped it since the controller last took them
        self.changed = threading.Event()
        self.links = LinkTable()  # measured by noodle.serve.linkprobe

    def join(self, req: JoinRequest, *, verified: bool = True) -> WorkerRecord:
        """Record ``req``'s node with a fresh secret; ``verified=False``: not planned until :meth:`verify`.

        Raises :class:`~noodle.serve.claims.ClaimRefused`: 409 while a live node holds the same id (its last
        heartbeat within ``heartbeat_timeout_s``), 400 when one more node would pass :mod:`noodle.sizes`.
        """
        now = time.time()
        prof = req.costs.profile("measured on join")
        rec = WorkerRecord(
            id=req.id, address=req.address, device_kind=req.device.kind, device_name=req.device.name,
            total_memory_bytes=req.device.total_memory_bytes, free_memory_bytes=req.device.free_memory_bytes,
            threads=req.device.threads, profile=prof, measured_prompt_tokens=req.costs.prompt_tokens,
            dtype=req.costs.dtype, cached=req.costs.cached, joined_at=now, last_heartbeat=now,
            secret=secrets.token_urlsafe(24), verified=verified,
        )  # fmt: skip
        with self._lock:
            live = [r for r in self._nodes.values() if r.alive and now - r.last_heartbeat <= self.heartbeat_timeout_s]
            old = self._nodes.get(req.id)
            if old is not None and old in live:
                raise ClaimRefused(409, "id", f"a live node is named {req.id!r} (at {old.address}, last heartbeat "
                                   f"{now - old.last_heartbeat:.1f} s ago); give this worker another --name, or "
                                   f"stop the other one (its name frees {self.heartbeat_timeout_s:g} s after its "
                                   "last heartbeat)", code="name_in_use")  # fmt: skip
            too_big = size_problem(len(prof.unit_names), len(live) + 1)
            if too_big:
                raise ClaimRefused(400, "id", f"{len(live)} live nodes and this one make {too_big} "
                                   "(see noodle/sizes.py)", code="too_many_nodes")  # fmt: skip
            self._nodes[req.id] = rec
            if verified:
                self._bump(f"{req.id} joined")
        self.changed.set()
        return rec

    def verify(self, node_id: str, secret: str, factor: float | None = None) -> bool:
        """Plan the node in: its table was timed on it; ``factor`` scales its whole table (measured / claimed).
        False when the node joined again (another secret) or died meanwhile."""
        with self._lock:
            rec = self._nodes.get(node_id)
            if rec is None or rec.secret != secret or not rec.alive:
                return False
            n = len(rec.profile.unit_names)
            self._nodes[node_id] = replace(rec, verified=True,
                                           corrections=rec.corrections if factor is None else ((0, n, float(factor)),))
            self._bump(f"{node_id} joined")
        self.changed.set()
        return True

    def refuse(self, node_id: str, secret: str, why: str) -> None:
        """The node failed its check: dead to the planner; its heartbeats are answered 403 with ``why``."""
        with self._lock:
            rec = self._nodes.get(node_id)
            if rec is not None and rec.secret == secret:
                self._nodes[node_id] = replace(rec, alive=False, refused=why)

    def pending(self) -> list[WorkerRecord]:
        """Live nodes not yet verified, oldest join first."""
        with self._lock:
            recs = [r for r in self._nodes.values() if r.alive and not r.verified]
        return sorted(recs, key=lambda r: r.joined_at)

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
        """Refresh a node; False when it is unknown or was declared dead (it must join again).

        Raises :class:`~noodle.serve.claims.ClaimRefused`: 403 when ``hb.secret`` is not the one its join got
        (a heartbeat speaks only for its own node) or the node was refused; 400 when it claims more free
        memory than its total.
        """
        with self._lock:
            rec = self._nodes.get(hb.id)
            if rec is None:
                return False
            if not hmac.compare_digest(rec.secret.encode(), hb.secret.encode()):
                raise ClaimRefused(403, "secret", f"not the secret node {hb.id!r} was given when it joined; a "
                                   "heartbeat speaks only for its own node", code="forbidden")  # fmt: skip
            if rec.refused:
                raise ClaimRefused(403, "id", f"node {hb.id!r} was refused: {rec.refused}", code="refused")
            if not rec.alive:
                return False
            if hb.free_memory_bytes > rec.total_memory_bytes:
                raise ClaimRefused(400, "free_memory_bytes", f"{hb.free_memory_bytes} free is more than the node's "
                                   f"total_memory_bytes {rec.total_memory_bytes}")  # fmt: skip
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

    def leave(self, node_id: str, secret: str) -> bool:
        """The node leaves on purpose: dead to the planner now (not after missed heartbeats); False when it was
        not live. Raises :class:`~noodle.serve.claims.ClaimRefused` (403) when ``secret`` is not its join's."""
        with self._lock:
            rec = self._nodes.get(node_id)
            if rec is None:
                return False
            if not hmac.compare_digest(rec.secret.encode(), secret.encode()):
                raise ClaimRefused(403, "secret", f"not the secret node {node_id!r} was given when it joined; only "
                                   "the node itself can say it leaves", code="forbidden")  # fmt: skip
            if not rec.alive:
                return False
            self._nodes[node_id] = replace(rec, alive=False)
            self._bump(f"{node_id} left")
        self.changed.set()
        return True

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
        """Every record; ``alive_only``: the nodes the planner may use (alive and verified)."""
        with self._lock:
            recs = list(self._nodes.values())
        return [r for r in recs if r.alive and r.verified] if alive_only else recs

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
    as the planner prices it (:func:`~noodle.profile.pernode.profile_decode_ms`; along the ``units``' batch curves)."""
    per_unit = profile_decode_ms(rec.profile, units, batch_size) if units else rec.profile.decode_latency_ms(batch_size)
    return float(sum(per_unit[start:end])) + rec.profile.step_overhead_ms


def cluster_spec(records: list[WorkerRecord], model: Path | ModelCard, *, concurrency: int = 8, continuous: bool = False,
                 name: str | None = None, time_limit_s: float = 5.0,
                 links: Mapping[str, tuple[LinkMeasurement, ...]] | None = None) -> dict[str, Any]:  # fmt: skip
    """A spec (mapping) for ``records`` serving ``model`` (a folder or its card): each node's memory, its measured
    unit costs and links.

    The workload is the model's context (3/4 prompt, 1/4 new tokens) with ``concurrency`` sequences in flight,
    as ``noodle serve`` runs them: ``continuous`` (its engine batches every running sequence per step) as
    ``streams = concurrency``, else one sequence per group and ``concurrency`` groups. ``hf_config`` is the absolute path
    of the model's config, so the document solves from any folder. ``links``: what each node measured
    to its peers (:meth:`LinkTable.measurements`), written to ``links.pairs``.
    """
    from noodle.cluster import NodeRecord, export_spec
    from noodle.types import Workload

    card = model if isinstance(model, ModelCard) else read_card(model)
    positions = card.context_tokens or 2048
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
    doc = export_spec(nodes, {"hf_config": str(card.config_path)}, workload,
                      name=name or f"cluster-{card.folder.name}")  # fmt: skip
    doc["solver"] = {"name": "auto", "time_limit_s": time_limit_s}
    return doc
