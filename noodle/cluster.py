"""A measured cluster as plain data, and the spec it exports to (``noodle cluster export``).

The registry of ``noodle serve`` keeps one :class:`NodeRecord` per worker that joined: what
the worker reported about itself (device, memory, threads), the model's units timed on its
own device (a :class:`~noodle.types.NodeProfile`, or the path of a ``noodle profile`` folder)
and the links it measured to its peers (:class:`LinkMeasurement`). :func:`export_spec` turns
the records into a spec mapping that :func:`noodle.spec.parse_spec` accepts and ``noodle
solve`` plans, with no figure written by hand::

    doc = export_spec(records, {"hf_config": "/models/gpt2/config.json"}, Workload(256, 64, 1))
    print(yaml.safe_dump(doc, sort_keys=False))          # what `noodle cluster export` prints

What the export writes, per node:

* ``memory_gb``: the free memory the node reported (what it can give now), else its total,
  rounded down to whole MiB;
* ``profile``: the node's measured unit costs inline (``{batch_size, source, step_overhead_ms,
  prefill_overhead_ms, units: [{name, latency_ms, decode_ms: {batch: ms}, param_bytes,
  kv_bytes_per_token, prefill_ms_per_token}]}``, see docs/spec.md; the overheads when measured), or the profile path the record names; ``source`` says which device and
  how many torch threads measured them. A record without measured costs needs a
  ``compute_score`` (exported as is); one with neither is refused;
* ``links.pairs``: one symmetric entry per measured pair. A pair measured from both ends
  takes the slower figures (lower bandwidth, higher latency); measurements to a peer that
  is not among the records are left out. ``links.default`` (pairs nobody measured) is the
  slowest measured figure of all, or 1 Gb/s and 0.5 ms when no link was measured.

Pure: no I/O, no clock; the result is validated with :func:`noodle.spec.parse_spec` (bounds,
one of compute_score/profile per node) but the units are checked against the model only when
the spec is loaded (that needs the model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from noodle.errors import SpecError
from noodle.spec import parse_spec
from noodle.types import Link, NodeProfile, Workload

__all__ = ["LinkMeasurement", "NodeRecord", "export_spec"]

_SOURCE = "noodle cluster export"
_UNMEASURED = Link(bandwidth_gbps=1.0, latency_ms=0.5)  # the spec's own default


@dataclass(frozen=True)
class LinkMeasurement:
    """A link a node measured to a peer: bandwidth and one-way latency (half the round trip)."""

    peer: str
    bandwidth_gbps: float
    latency_ms: float


@dataclass(frozen=True)
class NodeRecord:
    """What the coordinator knows about one worker.

    Attributes:
        id: node id (unique in the cluster).
        address: ``host:port`` of its worker, if any.
        device: device kind: ``cuda``, ``mps``, ``xpu`` or ``cpu``.
        device_name: e.g. ``NVIDIA GeForce RTX 3060``; informational.
        total_memory_bytes: the device's memory.
        free_memory_bytes: what was free when it reported; None when unknown.
        torch_threads: ``torch.get_num_threads()`` on the worker; informational.
        costs: the model's units timed on this node, or the path of its ``noodle profile`` folder.
        compute_score: speed relative to the reference device, for a node without ``costs``.
        links: what this node measured to its peers.
    """

    id: str
    address: str | None
    device: str
    device_name: str = ""
    total_memory_bytes: int = 0
    free_memory_bytes: int | None = None
    torch_threads: int | None = None
    costs: NodeProfile | str | None = None
    compute_score: float | None = None
    links: tuple[LinkMeasurement, ...] = ()


def _profile_doc(record: NodeRecord, prof: NodeProfile) -> dict[str, Any]:
    """The inline ``profile:`` mapping of a node's measured costs."""
    measured_on = record.device_name or record.device
    if record.torch_threads is not None:
        measured_on += f", {record.torch_threads} torch threads"
    units = []
    for i, name in enumerate(prof.unit_names):
        row: dict[str, Any] = {"name": name, "latency_ms": prof.latency_ms[i]}
        if prof.decode_ms:
            row["decode_ms"] = {b: ms[i] for b, ms in prof.decode_ms}
        if prof.param_bytes is not None:
            row["param_bytes"] = prof.param_bytes[i]
        if prof.kv_bytes_per_token is not None:
            row["kv_bytes_per_token"] = prof.kv_bytes_per_token[i]
        if prof.prefill_ms_per_token is not None:
            row["prefill_ms_per_token"] = prof.prefill_ms_per_token[i]
        units.append(row)
    source = measured_on if prof.source == "inline" else f"{measured_on} ({prof.source})"
    doc: dict[str, Any] = {"batch_size": prof.batch_size, "source": source}
    if prof.step_overhead_ms:
        doc["step_overhead_ms"] = prof.step_overhead_ms
    if prof.prefill_overhead_ms is not None:
        doc["prefill_overhead_ms"] = prof.prefill_overhead_ms
    return {**doc, "units": units}


def _node_doc(record: NodeRecord) -> dict[str, Any]:
    free = record.free_memory_bytes if record.free_memory_bytes is not None else record.total_memory_bytes
    mib = free // 2**20
    if mib <= 0:
        raise SpecError(f"{_SOURCE}: node {record.id!r}: reports {free} bytes of memory; a node needs at least 1 MiB")
    doc: dict[str, Any] = {"id": record.id, "device": record.device, "memory_gb": mib / 1024}
    if record.address:
        doc["address"] = record.address
    if record.compute_score is not None:
        doc["compute_score"] = record.compute_score
    if isinstance(record.costs, NodeProfile):
        doc["profile"] = _profile_doc(record, record.costs)
    elif isinstance(record.costs, str):
        doc["profile"] = record.costs
    elif record.compute_score is None:
        raise SpecError(f"{_SOURCE}: node {record.id!r}: no measured unit costs and no compute_score; "
                        f"let the worker time the model's units first")
    return doc


def _links_doc(records: Sequence[NodeRecord]) -> dict[str, Any]:
    ids = {r.id for r in records}
    pairs: dict[frozenset[str], Link] = {}
    for r in records:
        for m in r.links:
            if m.peer not in ids or m.peer == r.id:
                continue
            key = frozenset((r.id, m.peer))
            seen = pairs.get(key)
            link = Link(m.bandwidth_gbps, m.latency_ms)
            pairs[key] = link if seen is None else Link(min(seen.bandwidth_gbps, link.bandwidth_gbps),
                                                        max(seen.latency_ms, link.latency_ms))
    order = {r.id: i for i, r in enumerate(records)}
    out: list[dict[str, Any]] = []
    for key, link in pairs.items():
        a, b = sorted(key, key=order.__getitem__)
        out.append({"a": a, "b": b, "bandwidth_gbps": link.bandwidth_gbps, "latency_ms": link.latency_ms})
    out.sort(key=lambda p: (order[p["a"]], order[p["b"]]))
    default = _UNMEASURED if not pairs else Link(min(x.bandwidth_gbps for x in pairs.values()),
                                                 max(x.latency_ms for x in pairs.values()))
    return {"default": {"bandwidth_gbps": default.bandwidth_gbps, "latency_ms": default.latency_ms}, "pairs": out}


def export_spec(
    records: Sequence[NodeRecord],
    model_ref: Mapping[str, Any] | str,
    workload: Workload | Mapping[str, int],
    *,
    name: str = "cluster",
    objective: str = "throughput",
) -> dict[str, Any]:
    """A spec mapping with the cluster's measured numbers (see the module docstring for what it writes).

    Args:
        records: the nodes, in the order the spec lists them.
        model_ref: the spec's ``model:`` section (e.g. ``{"hf_config": ".../config.json"}``), or a str as
            shorthand for an ``hf_config`` path.
        workload: the workload the costs were measured for.
        name: the spec's name.
        objective: ``throughput`` or ``latency``.

    Raises:
        SpecError: no records, a duplicate id, a node without costs or compute_score, or a value the spec
            refuses (the message names the field).
    """
    if not records:
        raise SpecError(f"{_SOURCE}: no nodes have joined; start workers with `noodle worker --join`")
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise SpecError(f"{_SOURCE}: node {r.id!r} is listed twice; node ids are unique")
        seen.add(r.id)
    try:
        w = workload if isinstance(workload, Workload) else Workload(**workload)
    except TypeError as exc:
        raise SpecError(f"{_SOURCE}: workload: {exc}; give prompt_tokens, max_new_tokens, batch_size, concurrency "
                        "(or streams)") \
            from None
    doc: dict[str, Any] = {
        "name": name,
        "model": {"hf_config": model_ref} if isinstance(model_ref, str) else dict(model_ref),
        "workload": {"prompt_tokens": w.prompt_tokens, "max_new_tokens": w.max_new_tokens,
                     **({"streams": w.streams} if w.streams is not None
                        else {"batch_size": w.batch_size, "concurrency": w.concurrency})},
        "cluster": {"nodes": [_node_doc(r) for r in records], "links": _links_doc(records)},
        "objective": objective,
    }
    parse_spec(doc, source=_SOURCE)
    return doc
