"""``spec.yaml`` -> validated, frozen :class:`Spec` -> :class:`~noodle.types.Problem`.

All checks on user input live here: the document's shape and bounds (these models; the bounds in
:mod:`noodle.sizes`) and its cross-references, resolved into a Problem's units, nodes, links and
pins by :mod:`noodle.specresolve` (weight formats by :mod:`noodle.formatspec`). Errors read
``<file>: <field path>: <what is wrong>`` and raise :class:`~noodle.errors.SpecError`.
The JSON Schema in ``specs/spec.schema.json`` is generated from these models
(``python -m noodle.spec > specs/spec.schema.json``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictFloat, StrictInt, StrictStr, Tag, ValidationError,
    model_validator,
)

from noodle.docfile import load_document, validation_message
from noodle.errors import SpecError
from noodle.formats import FormatName
from noodle.sizes import (
    MAX_BATCH, MAX_BYTES, MAX_MEMORY_GB, MAX_MS, MAX_NODES, MAX_SCORE, MAX_TIME_LIMIT_S, MAX_TOKENS, MAX_UNITS, MIN_SCORE,
    size_problem,
)
from noodle.specresolve import resolve_cluster, resolve_constraints, resolve_units
from noodle.joint import JointModel, JointProblem
from noodle.types import Problem, Workload

__all__ = ["Spec", "load_spec", "load_joint_spec", "parse_spec", "MAX_MODELS", "spec_json_schema", "SOLVER_DEFAULT_TIME_LIMIT_S"]

SOLVER_DEFAULT_TIME_LIMIT_S = 10.0
MAX_MODELS = 64  # models in one spec placed jointly


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class LayerFormatSpec(_Strict):
    latency_ms: float = Field(ge=0, le=MAX_MS, description="one decode step in this format on the reference device")
    param_bytes: int = Field(ge=0, le=MAX_BYTES, description="weight bytes in this format")


class AccuracySpec(_Strict):
    measured: str = Field(description="JSON with measured figures per format: {formats: {int8: {token_agreement, "
                                      "perplexity_increase}}} (bench/results/quant.json)")
    min_token_agreement: float | None = Field(None, ge=0, le=1, description="greedy-token agreement with float32")
    max_perplexity_increase: float | None = Field(None, ge=0, le=MAX_SCORE, description="relative, 0.05 = +5 %")


class LayerSpec(_Strict):
    name: str = Field(min_length=1)
    latency_ms: float = Field(ge=0, le=MAX_MS, description="one decode step on the reference device (compute_score 1.0)")
    param_bytes: int = Field(ge=0, le=MAX_BYTES)
    activation_bytes: int = Field(ge=0, le=MAX_BYTES, description="bytes handed to the next unit per decode step")
    kv_bytes_per_token: int = Field(0, ge=0, le=MAX_BYTES)
    prefill_ms_per_token: float | None = Field(None, ge=0, le=MAX_MS)
    formats: dict[FormatName, LayerFormatSpec] = Field(default_factory=dict, description="costs in other formats")


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
    streams: int | None = Field(None, ge=1, le=MAX_BATCH, description="continuous batching (the serving engine): "
                                "sequences in flight; with S stages min(S, streams) batches circulate, each stage "
                                "steps one per forward (replaces batch_size and concurrency)")

    @model_validator(mode="after")
    def _one_mode(self) -> WorkloadSpec:
        given = [k for k in ("batch_size", "concurrency") if k in self.model_fields_set]
        if self.streams is not None and given:
            raise ValueError(f"streams ({self.streams}) sizes the batches itself: drop "
                             f"{' and '.join(f'{k} ({getattr(self, k)})' for k in given)}, or drop streams "
                             f"for fixed groups")
        return self


class JointModelSpec(ModelSpec):
    """One model of a spec with ``models:`` (placed jointly with the others on the shared cluster)."""

    name: str = Field(min_length=1, max_length=200, description="the model's name (labels its stages in the plan)")
    workload: WorkloadSpec | None = Field(None, description="its workload; default: the spec's workload")
    weight: float | None = Field(None, gt=0, le=MAX_SCORE, description="its share: the planner maximises the "
                                 "smallest tokens/s / weight over the models (default 1)")
    required_tokens_per_s: float | None = Field(None, gt=0, le=MAX_SCORE, description="the tokens/s it must get "
                                                "(instead of weight; then every model gives one)")

    @model_validator(mode="after")
    def _one_share(self) -> JointModelSpec:
        if self.weight is not None and self.required_tokens_per_s is not None:
            raise ValueError(f"model {self.name!r}: give weight ({self.weight:g}) or required_tokens_per_s "
                             f"({self.required_tokens_per_s:g}), not both")
        return self


class UnitCostSpec(_Strict):
    name: str = Field(min_length=1, description="unit name, as in the model's chain (embed, block.0, ..., lm_head)")
    latency_ms: float = Field(ge=0, le=MAX_MS, description="one decode step on this node, at the profile's batch_size")
    decode_ms: dict[Annotated[int, Field(ge=1, le=MAX_BATCH)], Annotated[float, Field(ge=0, le=MAX_MS)]] = Field(
        default_factory=dict, description="decode steps measured at other batch sizes, {batch_size: ms}")
    param_bytes: int | None = Field(None, ge=0, le=MAX_BYTES, description="weight bytes on this node; default: the model's")
    kv_bytes_per_token: int | None = Field(None, ge=0, le=MAX_BYTES, description="default: the model's")
    prefill_ms_per_token: float | None = Field(None, ge=0, le=MAX_MS)


class NodeProfileSpec(_Strict):
    """A node's own measured unit costs, inline (what `noodle cluster export` writes)."""

    batch_size: int = Field(1, ge=1, le=MAX_BATCH, description="the batch size latency_ms was measured at")
    source: str | None = Field(None, description="where the numbers come from (free text)")
    step_overhead_ms: float = Field(0.0, ge=0, le=MAX_MS, description="fixed work of one decode step of a stage on "
                                    "this node, paid once per step by the stage it holds")
    prefill_overhead_ms: float | None = Field(None, ge=0, le=MAX_MS, description="the same for a prefill step")
    units: list[UnitCostSpec] = Field(min_length=1, max_length=MAX_UNITS, description="every unit, in chain order")


def _profile_form(value: Any) -> str | None:
    return "path" if isinstance(value, str) else "inline" if isinstance(value, dict | NodeProfileSpec) else None


NodeProfileField = Annotated[
    Union[Annotated[str, Tag("path")], Annotated[NodeProfileSpec, Tag("inline")]],
    Discriminator(_profile_form, custom_error_type="profile_form",
                  custom_error_message="expected a profile path (folder, units.json or metrics.jsonl) "
                                       "or an inline profile (a mapping with units)"),
]


class NodeSpec(_Strict):
    id: str = Field(min_length=1)
    device: str = Field("cpu", min_length=1)
    memory_gb: float = Field(gt=0, le=MAX_MEMORY_GB, description="GiB (2^30 bytes)")
    compute_score: float | None = Field(None, ge=MIN_SCORE, le=MAX_SCORE,
                                        description="speed relative to the reference device; needed without a profile")
    address: str | None = Field(None, description="host:port of this node's gRPC worker")
    formats: list[FormatName] | None = Field(None, min_length=1, description="weight formats this node may run; "
                                             "default: the spec's formats")
    profile: NodeProfileField | None = Field(
        None, description="this node's own measured unit costs: a `noodle profile` folder, its units.json or "
                          "metrics.jsonl, or inline {batch_size, units: [{name, latency_ms, ...}]}")

    @model_validator(mode="after")
    def _speed_given(self) -> NodeSpec:
        if self.compute_score is None and self.profile is None:
            raise ValueError(f"node {self.id!r} needs compute_score (its speed relative to the reference device) "
                             f"or profile (its own measured unit costs)")
        return self


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
    options: dict[str, StrictBool | StrictInt | StrictFloat | StrictStr] = Field(
        default_factory=dict, description="options of this solver, passed through to it (e.g. milp: backend, "
        "mip_rel_gap, threads, presolve; cpsat: num_workers, presolve; heuristic: seed); checked when solving")


class Spec(_Strict):
    """A whole spec file, validated."""

    name: str = "noodle"
    model: ModelSpec | None = Field(None, description="the model to place (or models: several, placed jointly)")
    models: list[JointModelSpec] | None = Field(None, min_length=1, max_length=MAX_MODELS, description="several "
                                                "models placed jointly on the shared cluster (instead of model)")
    workload: WorkloadSpec = WorkloadSpec()
    cluster: ClusterSpec
    objective: Literal["throughput", "latency"] = "throughput"
    solver: SolverSpec = SolverSpec()
    constraints: ConstraintsSpec = ConstraintsSpec()
    formats: list[FormatName] | None = Field(None, min_length=1, description="weight formats the planner may "
                                             "choose per stage (default: the checkpoint's float32 only)")
    accuracy: AccuracySpec | None = Field(None, description="accuracy budget a format must meet to be chosen")

    @model_validator(mode="after")
    def _model_or_models(self) -> Spec:
        if (self.model is None) == (self.models is None):
            raise ValueError("give model (one model) or models (a list, placed jointly), "
                             + ("not both" if self.model is not None else "got neither"))
        if self.models is None:
            return self
        if self.objective != "throughput":
            raise ValueError("objective: models are placed for throughput (their weighted minimum); drop latency")
        for key in ("formats", "accuracy"):
            if getattr(self, key) is not None:
                raise ValueError(f"{key}: weight formats are chosen for one model only; drop {key} with models")
        if self.constraints.pins:
            raise ValueError("constraints.pins: pins name one model's units; drop them with models")
        for i, n in enumerate(self.cluster.nodes):
            if n.profile is not None:
                raise ValueError(f"cluster.nodes[{i}].profile: a node profile prices one model's units; "
                                 f"give {n.id!r} a compute_score instead with models")
        return self

    def to_problem(self, base_dir: str | Path = ".", *, source: str = "spec",
                   hf_config: dict[str, Any] | None = None) -> Problem:  # fmt: skip
        """Resolve the model source and build the solver-facing Problem (checks cross-references).

        ``hf_config``: the parsed object of the model's ``hf_config`` file, when the caller read it already
        (:attr:`noodle.models.card.ModelCard.config`): it is used instead of reading the file again.
        """
        if self.models is not None:
            raise SpecError(f"{source}: models: {len(self.models)} models are placed jointly: plan them with "
                            f"`noodle solve` (or give one model)")
        workload = Workload(**self.workload.model_dump())
        _check_counts(self, source)  # before anything that grows with them (links are nodes^2)
        units = resolve_units(self, Path(base_dir), workload, source, hf_config=hf_config)
        too_big = size_problem(len(units), len(self.cluster.nodes))
        if too_big:
            raise SpecError(f"{source}: model, cluster.nodes: {too_big} (see noodle/sizes.py)")
        cluster = resolve_cluster(self, source, units, Path(base_dir))
        constraints = resolve_constraints(self, units, cluster, source)
        problem = Problem(units, cluster, workload, self.objective, constraints, self.name)
        if self.formats is None and all(n.formats is None for n in self.cluster.nodes):
            if self.accuracy is not None:
                raise SpecError(f"{source}: accuracy: an accuracy budget needs formats to choose from; add formats")
            return problem
        from noodle.formatspec import resolve_formats

        return replace(problem, formats=resolve_formats(self, problem, Path(base_dir), source))


    def to_joint_problem(self, base_dir: str | Path = ".", *, source: str = "spec") -> JointProblem:
        """Resolve every model of ``models:`` into a :class:`~noodle.joint.JointProblem` on the shared cluster."""
        if self.models is None:
            raise SpecError(f"{source}: models: missing; this spec places one model (model:)")
        _check_counts(self, source)
        base = Path(base_dir)
        entries = []
        required = [m.required_tokens_per_s is not None for m in self.models]
        for i, m in enumerate(self.models):
            where = f"{source}: models[{i}]"
            if any(required) and not required[i]:
                raise SpecError(f"{where}: give required_tokens_per_s as the other models do (or weights for all)")
            ws = m.workload or self.workload
            if ws.streams is not None:
                raise SpecError(f"{where}.workload.streams: joint placement prices fixed groups; give batch_size "
                                f"and concurrency instead")
            workload = Workload(**ws.model_dump())
            units = resolve_units(self, base, workload, source, model=m, field=f"models[{i}]")
            too_big = size_problem(len(units), len(self.cluster.nodes))
            if too_big:
                raise SpecError(f"{where}, cluster.nodes: {too_big} (see noodle/sizes.py)")
            cluster = resolve_cluster(self, source, units, base)
            constraints = resolve_constraints(self, units, cluster, source)
            problem = Problem(units, cluster, workload, "throughput", constraints, f"{self.name}/{m.name}")
            share = m.required_tokens_per_s if required[i] else (m.weight or 1.0)
            entries.append(JointModel(m.name, problem, float(share or 1.0), required[i]))
        names = [m.name for m in self.models]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise SpecError(f"{source}: models[{i}].name: duplicate model name {name!r}")
        return JointProblem(tuple(entries), self.name)


def _check_counts(spec: Spec, source: str) -> None:
    """Node and layer counts within :mod:`noodle.sizes` (the spec file's size itself is checked on load)."""
    k = len(spec.cluster.nodes)
    if k > MAX_NODES:
        raise SpecError(f"{source}: cluster.nodes: {k} nodes, at most {MAX_NODES} are supported; "
                        f"group identical machines or plan a subset")
    models = [("model", spec.model)] if spec.model is not None else [
        (f"models[{i}]", m) for i, m in enumerate(spec.models or [])]
    for field, m in models:
        if m is not None and m.layers is not None and len(m.layers) > MAX_UNITS:
            raise SpecError(f"{source}: {field}.layers: {len(m.layers)} units, at most {MAX_UNITS} are supported; "
                            f"merge consecutive layers into coarser units")


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


def load_joint_spec(path: str | Path) -> tuple[Spec, Problem | JointProblem]:
    """Like :func:`load_spec`, but a spec with ``models:`` resolves to a :class:`~noodle.joint.JointProblem`."""
    path = Path(path)
    spec = parse_spec(load_document(path, "spec"), str(path))
    if spec.models is not None:
        return spec, spec.to_joint_problem(path.parent, source=str(path))
    return spec, spec.to_problem(path.parent, source=str(path))


def spec_json_schema() -> dict[str, Any]:
    schema = Spec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "noodle spec"
    return schema


if __name__ == "__main__":
    print(json.dumps(spec_json_schema(), indent=2))
