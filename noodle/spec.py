"""``spec.yaml`` -> validated, frozen :class:`Spec` -> :class:`~noodle.types.Problem`.

All checks on user input live here. Errors read
``<file>: <field path>: <what is wrong>`` and raise :class:`~noodle.errors.SpecError`.
The JSON Schema in ``specs/spec.schema.json`` is generated from these models
(``python -m noodle.spec > specs/spec.schema.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from noodle.docfile import load_document, validation_message
from noodle.errors import NoodleError, SpecError
from noodle.extras import require_exec
from noodle.graph.build import build_cost_graph, problem_from_graph
from noodle.sizes import MAX_NODES, MAX_UNITS, size_problem
from noodle.types import Cluster, Constraints, Link, Node, Pin, Problem, Unit, Workload

__all__ = ["Spec", "load_spec", "parse_spec", "spec_json_schema", "SOLVER_DEFAULT_TIME_LIMIT_S"]

SOLVER_DEFAULT_TIME_LIMIT_S = 10.0

# Bounds on numbers (documented in docs/spec.md and docs/troubleshooting.md): finite, and small enough that
# sums and products over every unit and node stay exact in float64 and int64.
MAX_BYTES = 2**50  # 1 PiB per unit
MAX_MS = 1e9  # about 11.6 days per step
MAX_TOKENS = 2**24
MAX_BATCH = 2**16
MAX_MEMORY_GB = 2.0**20  # 1 PiB per node
MIN_SCORE, MAX_SCORE = 1e-6, 1e6  # compute_score, tflops, GB/s: positive and not vanishingly small
MAX_TIME_LIMIT_S = 1e6


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class LayerSpec(_Strict):
    name: str = Field(min_length=1)
    latency_ms: float = Field(ge=0, le=MAX_MS, description="one decode step on the reference device (compute_score 1.0)")
    param_bytes: int = Field(ge=0, le=MAX_BYTES)
    activation_bytes: int = Field(ge=0, le=MAX_BYTES, description="bytes handed to the next unit per decode step")
    kv_bytes_per_token: int = Field(0, ge=0, le=MAX_BYTES)
    prefill_ms_per_token: float | None = Field(None, ge=0, le=MAX_MS)


class ReferenceSpec(_Strict):
    tflops: float = Field(1.0, ge=MIN_SCORE, le=MAX_SCORE)
    mem_bandwidth_gbps: float = Field(50.0, ge=MIN_SCORE, le=MAX_SCORE)


class ModelSpec(_Strict):
    layers: list[LayerSpec] | None = Field(None, min_length=1)
    profile: str | None = Field(None, description="metrics.jsonl, units.json or the folder `noodle profile` wrote")
    hf_config: str | None = Field(None, description="transformers config.json (analytic estimate)")
    dtype: Literal["float32", "float16", "bfloat16", "int8", "float8"] | None = None
    reference: ReferenceSpec | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSpec:
        given = [k for k in ("layers", "profile", "hf_config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of layers, profile, hf_config (got {', '.join(given) or 'none'})")
        if (self.dtype or self.reference) and not self.hf_config:
            raise ValueError("dtype and reference apply to hf_config only")
        return self


class WorkloadSpec(_Strict):
    prompt_tokens: int = Field(128, ge=1, le=MAX_TOKENS)
    max_new_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    batch_size: int = Field(1, ge=1, le=MAX_BATCH, description="sequences per group (micro-batch), stepped together")
    concurrency: int = Field(1, ge=1, le=MAX_BATCH, description="groups in flight at once in the pipeline; every stage holds their KV caches")


class NodeSpec(_Strict):
    id: str = Field(min_length=1)
    device: str = Field("cpu", min_length=1)
    memory_gb: float = Field(gt=0, le=MAX_MEMORY_GB, description="GiB (2^30 bytes)")
    compute_score: float = Field(ge=MIN_SCORE, le=MAX_SCORE, description="speed relative to the reference device")
    address: str | None = Field(None, description="host:port of this node's gRPC worker")


class LinkSpec(_Strict):
    bandwidth_gbps: float = Field(ge=MIN_SCORE, le=MAX_SCORE)
    latency_ms: float = Field(ge=0, le=MAX_MS)


class PairSpec(LinkSpec):
    a: str
    b: str


class LinksSpec(_Strict):
    default: LinkSpec = LinkSpec(bandwidth_gbps=1.0, latency_ms=0.5)
    pairs: list[PairSpec] = []


class ClusterSpec(_Strict):
    nodes: list[NodeSpec] = Field(min_length=1)
    links: LinksSpec = LinksSpec()


class PinSpec(_Strict):
    node: str
    from_: str = Field(alias="from", description="first unit name (inclusive)")
    to: str | None = Field(None, description="last unit name (inclusive); default: same as from")


class ConstraintsSpec(_Strict):
    pins: list[PinSpec] = []
    exclude: list[str] = []
    max_stages: int | None = Field(None, ge=1, le=2**20)


class SolverSpec(_Strict):
    name: str = "auto"
    time_limit_s: float = Field(SOLVER_DEFAULT_TIME_LIMIT_S, gt=0, le=MAX_TIME_LIMIT_S)


class Spec(_Strict):
    """A whole spec file, validated."""

    name: str = "noodle"
    model: ModelSpec
    workload: WorkloadSpec = WorkloadSpec()
    cluster: ClusterSpec
    objective: Literal["throughput", "latency"] = "throughput"
    solver: SolverSpec = SolverSpec()
    constraints: ConstraintsSpec = ConstraintsSpec()

    def to_problem(self, base_dir: str | Path = ".", *, source: str = "spec") -> Problem:
        """Resolve the model source and build the solver-facing Problem (checks cross-references)."""
        workload = Workload(**self.workload.model_dump())
        _check_counts(self, source)  # before anything that grows with them (links are nodes^2)
        units = _units(self, Path(base_dir), workload, source)
        too_big = size_problem(len(units), len(self.cluster.nodes))
        if too_big:
            raise SpecError(f"{source}: model, cluster.nodes: {too_big} (see noodle/sizes.py)")
        cluster = _cluster(self, source)
        constraints = _constraints(self, units, cluster, source)
        graph = build_cost_graph(units, cluster, workload)
        return problem_from_graph(graph, objective=self.objective, constraints=constraints, name=self.name)


def _check_counts(spec: Spec, source: str) -> None:
    """Node and layer counts within :mod:`noodle.sizes` (the spec file's size itself is checked on load)."""
    k = len(spec.cluster.nodes)
    if k > MAX_NODES:
        raise SpecError(f"{source}: cluster.nodes: {k} nodes, at most {MAX_NODES} are supported; "
                        f"group identical machines or plan a subset")
    layers = spec.model.layers
    if layers is not None and len(layers) > MAX_UNITS:
        raise SpecError(f"{source}: model.layers: {len(layers)} units, at most {MAX_UNITS} are supported; "
                        f"merge consecutive layers into coarser units")


def _units(spec: Spec, base: Path, workload: Workload, source: str) -> tuple[Unit, ...]:
    m = spec.model
    if m.layers is not None:
        names = [layer.name for layer in m.layers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SpecError(f"{source}: model.layers: duplicate unit names {', '.join(dup)}")
        return tuple(Unit(**layer.model_dump()) for layer in m.layers)
    if m.profile is not None:
        from noodle.profile import load_units

        units, _meta = load_units(base / m.profile)
        return tuple(units)
    require_exec(f"{source}: model.hf_config (the analytic profile builds the model on the meta device)")
    from noodle.graph.analytic import ReferenceDevice, analytic_units
    from noodle.models.loading import load_config

    path = base / str(m.hf_config)
    try:
        config = load_config(path)
        ref = ReferenceDevice(**m.reference.model_dump()) if m.reference else ReferenceDevice()
        return analytic_units(config, workload, dtype=m.dtype, reference=ref).units
    except NoodleError as exc:
        raise SpecError(f"{source}: model.hf_config: {exc}") from None


def _cluster(spec: Spec, source: str) -> Cluster:
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
    nodes = tuple(Node(**n.model_dump()) for n in spec.cluster.nodes)
    default = Link(**spec.cluster.links.default.model_dump())
    return Cluster(nodes, default, tuple(pairs))


def _constraints(spec: Spec, units: tuple[Unit, ...], cluster: Cluster, source: str) -> Constraints:
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


def parse_spec(data: Any, source: str = "spec") -> Spec:
    """Validate a spec given as a Python mapping."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: (top level): expected a mapping of keys, got {type(data).__name__}")
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(validation_message(source, exc)) from None


def load_spec(path: str | Path) -> tuple[Spec, Problem]:
    """Read, validate and resolve a spec file; relative paths inside it are relative to the file."""
    path = Path(path)
    data = load_document(path, "spec")
    spec = parse_spec(data, str(path))
    return spec, spec.to_problem(path.parent, source=str(path))


def spec_json_schema() -> dict[str, Any]:
    schema = Spec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "noodle spec"
    return schema


if __name__ == "__main__":
    print(json.dumps(spec_json_schema(), indent=2))
