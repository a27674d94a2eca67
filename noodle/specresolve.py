"""A validated :class:`~noodle.spec.Spec` resolved into a Problem's parts: units, nodes, links and pins.

The cross-references of a spec, checked with the field path and the numbers: the model's unit
chain (``layers``, a ``profile`` folder, or the analytic estimate of a ``hf_config``, which carries
each unit's batch curve), each node's own profile read and matched to that chain (a node with a
profile and no ``compute_score`` gets the model's total decode time over its own), links between
known nodes, and pins over known units and nodes. :meth:`~noodle.spec.Spec.to_problem` calls these
in turn; weight formats are :mod:`noodle.formatspec`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from noodle.docfile import load_document
from noodle.errors import DependencyMissing, NoodleError, SpecError
from noodle.extras import require_exec
from noodle.profile.pernode import profile_decode_ms
from noodle.sizes import MAX_BATCH, MAX_SCORE, MIN_SCORE
from noodle.types import Cluster, Constraints, Link, Node, NodeProfile, Pin, Unit, Workload

if TYPE_CHECKING:
    from noodle.spec import ModelSpec, NodeSpec, Spec

__all__ = ["resolve_units", "resolve_cluster", "resolve_constraints"]


def resolve_units(spec: Spec, base: Path, workload: Workload, source: str, *, model: ModelSpec | None = None,
                  field: str = "model", hf_config: dict[str, Any] | None = None) -> tuple[Unit, ...]:
    """The model's unit chain: its ``layers``, its ``profile``, or the analytic estimate of its ``hf_config``.

    ``model``: one entry of ``models:`` (named ``field`` in errors) instead of the spec's ``model``.
    ``hf_config``: the ``hf_config`` file's parsed object when the caller read it already (not read again).
    """
    m = model if model is not None else spec.model
    if m is None:
        raise SpecError(f"{source}: {field}: missing; give layers, profile or hf_config")
    if m.layers is not None:
        names = [layer.name for layer in m.layers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SpecError(f"{source}: {field}.layers: duplicate unit names {', '.join(dup)}")
        return tuple(Unit(**layer.model_dump(exclude={"formats"})) for layer in m.layers)
    if m.profile is not None:
        from noodle.profile.units import load_units

        units, _meta = load_units(base / m.profile)
        return tuple(units)
    from noodle.models.analytic import ReferenceDevice, analytic_units
    from noodle.models.paramcount import facts_of

    path = base / str(m.hf_config)
    try:
        raw = hf_config if hf_config is not None else \
            load_document(path / "config.json" if path.is_dir() else path, f"{field}.hf_config")
        ref = ReferenceDevice(**m.reference.model_dump()) if m.reference else ReferenceDevice()
        if isinstance(raw, dict) and facts_of(raw) is not None:  # counted from the config alone: no torch
            return analytic_units(raw, workload, dtype=m.dtype, reference=ref).units
        kind = raw.get("model_type") if isinstance(raw, dict) else None
        require_exec(f"{source}: {field}.hf_config of model_type {kind!r} (counted by building the model on the meta device)")
        from noodle.models.loading import load_config

        parsed = load_config(dict(raw) if hf_config is not None and isinstance(raw, dict) else path)
        return analytic_units(parsed, workload, dtype=m.dtype, reference=ref).units
    except DependencyMissing:
        raise
    except NoodleError as exc:
        raise SpecError(f"{source}: {field}.hf_config: {exc}") from None


def _node_profile(n: NodeSpec, i: int, units: tuple[Unit, ...], base: Path, source: str) -> NodeProfile:
    """The node's own profile, read and checked against the model's unit chain."""
    where = f"{source}: cluster.nodes[{i}].profile"
    if n.profile is None:
        raise SpecError(f"{where}: missing; give a profile folder, units.json or inline units")
    if isinstance(n.profile, str):
        from noodle.profile.units import load_units

        try:
            mine, meta = load_units(base / n.profile)
        except SpecError as exc:
            raise SpecError(f"{where}: {exc}") from None
        batch = (meta.get("workload") or {}).get("batch_size")
        prefill = [u.prefill_ms_per_token for u in mine]
        prof = NodeProfile(
            unit_names=tuple(u.name for u in mine), latency_ms=tuple(u.latency_ms for u in mine),
            batch_size=batch if isinstance(batch, int) and 1 <= batch <= MAX_BATCH else 1,
            param_bytes=tuple(u.param_bytes for u in mine), kv_bytes_per_token=tuple(u.kv_bytes_per_token for u in mine),
            prefill_ms_per_token=None if None in prefill else tuple(p for p in prefill if p is not None),
            source=str(meta.get("source", n.profile)),
        )
    else:
        rows = n.profile.units
        model_names = [u.name for u in units]
        prof = NodeProfile(unit_names=tuple(r.name for r in rows), latency_ms=tuple(r.latency_ms for r in rows),
                           batch_size=n.profile.batch_size, source=n.profile.source or "inline")
        wrong = prof.mismatch(model_names)
        if wrong:
            raise SpecError(f"{where}.units: {wrong}; list the model's {len(units)} units in chain order")
        batches = sorted(rows[0].decode_ms)
        for k, r in enumerate(rows):
            if sorted(r.decode_ms) != batches:
                raise SpecError(f"{where}.units[{k}].decode_ms: batch sizes {sorted(r.decode_ms)} differ from "
                                f"units[0]'s {batches}; give every unit the same batch sizes")
        prefill = [r.prefill_ms_per_token for r in rows]
        prof = NodeProfile(
            unit_names=prof.unit_names, latency_ms=prof.latency_ms, batch_size=prof.batch_size,
            decode_ms=tuple((b, tuple(r.decode_ms[b] for r in rows)) for b in batches if b != prof.batch_size),
            param_bytes=None if all(r.param_bytes is None for r in rows)
            else tuple(u.param_bytes if r.param_bytes is None else r.param_bytes for r, u in zip(rows, units)),
            kv_bytes_per_token=None if all(r.kv_bytes_per_token is None for r in rows)
            else tuple(u.kv_bytes_per_token if r.kv_bytes_per_token is None else r.kv_bytes_per_token
                       for r, u in zip(rows, units)),
            prefill_ms_per_token=None if None in prefill else tuple(p for p in prefill if p is not None),
            source=prof.source, step_overhead_ms=n.profile.step_overhead_ms,
            prefill_overhead_ms=n.profile.prefill_overhead_ms,
        )
    wrong = prof.mismatch([u.name for u in units])
    if wrong:
        raise SpecError(f"{where}: {wrong}; profile the same model on {n.id!r}")
    return prof


def _node(n: NodeSpec, i: int, units: tuple[Unit, ...], base: Path, source: str, batch_size: int) -> Node:
    """A node; one with a profile and no compute_score gets the model's total decode time over its own."""
    prof = _node_profile(n, i, units, base, source) if n.profile is not None else None
    score = n.compute_score
    if score is None:
        if prof is None:  # NodeSpec's validator requires one of them
            raise SpecError(f"{source}: cluster.nodes[{i}]: give compute_score or profile")
        mine, ref = sum(profile_decode_ms(prof, units, batch_size)), sum(u.latency_at(batch_size) for u in units)
        score = min(max(ref / mine, MIN_SCORE), MAX_SCORE) if mine > 0 and ref > 0 else 1.0
    return Node(id=n.id, device=n.device, memory_gb=n.memory_gb, compute_score=score, address=n.address, profile=prof)


def resolve_cluster(spec: Spec, source: str, units: tuple[Unit, ...], base: Path) -> Cluster:
    """The cluster: unique node ids, each node with its profile, links between known nodes given once."""
    ids = [n.id for n in spec.cluster.nodes]
    first: dict[str, int] = {}
    for i, nid in enumerate(ids):
        if first.setdefault(nid, i) != i:
            raise SpecError(f"{source}: cluster.nodes[{i}].id: duplicate node id {nid!r}")
    pairs = []
    seen: set[frozenset[str]] = set()
    for i, p in enumerate(spec.cluster.links.pairs):
        for end in ("a", "b"):
            if getattr(p, end) not in ids:
                raise SpecError(
                    f"{source}: cluster.links.pairs[{i}].{end}: unknown node {getattr(p, end)!r}; "
                    f"nodes are {', '.join(ids)}"
                )
        if p.a == p.b:
            raise SpecError(f"{source}: cluster.links.pairs[{i}]: a link joins two different nodes (a = b = {p.a!r})")
        key = frozenset((p.a, p.b))
        if key in seen:
            raise SpecError(f"{source}: cluster.links.pairs[{i}]: link {p.a}-{p.b} is given twice")
        seen.add(key)
        pairs.append((p.a, p.b, Link(p.bandwidth_gbps, p.latency_ms)))
    batch = spec.workload.batch_size
    nodes = tuple(_node(n, i, units, base, source, batch) for i, n in enumerate(spec.cluster.nodes))
    default = Link(**spec.cluster.links.default.model_dump())
    return Cluster(nodes, default, tuple(pairs))


def resolve_constraints(spec: Spec, units: tuple[Unit, ...], cluster: Cluster, source: str) -> Constraints:
    """Excludes and pins over known nodes and units (a pin's ``from``/``to`` inclusive, in chain order, not overlapping)."""
    c = spec.constraints
    ids = cluster.node_ids
    for i, nid in enumerate(c.exclude):
        if nid not in ids:
            raise SpecError(f"{source}: constraints.exclude[{i}]: unknown node {nid!r}; nodes are {', '.join(ids)}")
    if len(set(c.exclude)) == len(ids):
        raise SpecError(f"{source}: constraints.exclude: all {len(ids)} nodes are excluded; leave at least one")
    index = {u.name: i for i, u in enumerate(units)}
    pins: list[Pin] = []
    for i, p in enumerate(c.pins):
        where = f"{source}: constraints.pins[{i}]"
        if p.node not in ids:
            raise SpecError(f"{where}.node: unknown node {p.node!r}; nodes are {', '.join(ids)}")
        if p.node in c.exclude:
            raise SpecError(f"{where}.node: node {p.node!r} is pinned and excluded at once")
        first, last = p.from_, p.to or p.from_
        for field, name in (("from", first), ("to", last)):
            if name not in index:
                sample = ", ".join(list(index)[:4])
                raise SpecError(f"{where}.{field}: unknown unit {name!r}; units are {sample}, ... ({len(index)} in all)")
        if index[last] < index[first]:
            raise SpecError(f"{where}: 'to' ({last}) comes before 'from' ({first}) in the unit chain")
        pin = Pin(index[first], index[last] + 1, p.node)
        for j, other in enumerate(pins):
            if other.node != pin.node and other.start < pin.end and pin.start < other.end:
                raise SpecError(f"{where}: overlaps pins[{j}] on node {other.node!r}; a unit sits on one node")
        pins.append(pin)
    return Constraints(tuple(pins), frozenset(c.exclude), c.max_stages)
