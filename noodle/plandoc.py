"""The plan file (``plan.json`` / ``plan.yaml``): what ``noodle solve`` writes and executors read.

A strict, frozen pydantic model because it crosses a file boundary. The top-level
keys ``objective``, ``objective_ms``, ``solver``, ``predicted`` and ``stages`` are a
contract with users; the rest (``units``, ``workload``, ``nodes``, ``links``) lets
executors check the plan against a model and emulate the planned cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from noodle.docfile import load_document, validation_message
from noodle.errors import SpecError
from noodle.graph.costmodel import CostModel, Evaluation, cost_model_for, evaluate, pipeline_tokens_per_s
from noodle.graph.formats import FixedFormats, FormatCostModel, choose_formats, format_reason
from noodle.solvers.base import SolveResult
from noodle.types import GIB, Problem, Workload

__all__ = ["even_cuts", "check_consistent", "SolverInfo", "Predicted", "StageDoc", "NodeDoc", "LinkDoc", "PlanDoc", "load_plan", "dump_plan", "plan_document"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Finite(_Frozen):
    """What executors compute with (sleeps, memory, ranges): finite numbers only."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


_MAX_UNITS = 2**20
_Count = Annotated[int, Field(ge=0, le=2**24)]


class SolverInfo(_Frozen):
    name: str
    status: str  # optimal | feasible | infeasible | heuristic | baseline
    solve_time_s: float
    gap: float | None = None
    bound_ms: float | None = None
    note: str = ""


class Predicted(_Frozen):
    token_latency_ms: float
    bottleneck_ms: float
    tokens_per_s: float
    pipeline_tokens_per_s: float | None = Field(
        None, description="tokens/s with the workload's concurrency groups of batch_size sequences in flight; "
                          "under continuous batching (streams) streams / round_ms"
    )
    streams: int | None = Field(None, description="continuous batching: sequences in flight the plan is priced for")
    step_batch: int | None = Field(None, description="continuous batching: sequences a stage steps at once")
    round_ms: float | None = Field(None, description="continuous batching: max(batches x bottleneck, trip), the "
                                                     "time in which every stream gains one token")


class StageDoc(_Finite):
    stage_id: int = Field(ge=0, le=_MAX_UNITS)
    node: str
    device: str
    layers: list[str]
    start: int = Field(ge=0, le=_MAX_UNITS)
    end: int = Field(ge=0, le=_MAX_UNITS)
    compute_ms: float = Field(ge=0)
    hop_ms: float = Field(ge=0, description="time to hand this stage's output on (to the next stage, or the token back)")
    expected_latency_ms: float = Field(description="compute_ms + hop_ms")
    memory_required_mb: float
    memory_available_mb: float
    rationale: str
    format: Literal["float32", "bfloat16", "int8", "int4"] = Field("float32", description="weight format of the stage's slice (noodle.models.quant.FORMATS)")


class NodeDoc(_Finite):
    id: str
    device: str
    memory_gb: float = Field(gt=0)
    compute_score: float = Field(gt=0)
    address: str | None = None


class LinkDoc(_Finite):
    a: str
    b: str
    bandwidth_gbps: float = Field(gt=0)
    latency_ms: float = Field(ge=0)


class PlanDoc(_Frozen):
    version: int = 1
    name: str
    objective: str
    objective_ms: float
    cost_model: str
    solver: SolverInfo
    predicted: Predicted
    stages: list[StageDoc]
    units: list[str]
    workload: dict[str, _Count]
    nodes: list[NodeDoc]
    links: list[LinkDoc] = Field(default_factory=list, description="links between consecutive stages")

    def as_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        for key in _BATCHED_ONLY:  # a plan priced in groups reads as it always did
            if data["predicted"].get(key) is None:
                data["predicted"].pop(key, None)
        return data


_BATCHED_ONLY = ("streams", "step_batch", "round_ms")


def even_cuts(num_units: int, stages: int) -> list[int]:
    """Unit boundaries splitting the blocks evenly over ``stages`` (embed on the first, head on the last)."""
    blocks = num_units - 2
    if not 1 <= stages <= blocks:
        raise SpecError(f"stages: must be between 1 and the {blocks} blocks, got {stages}")
    return [0, *(1 + round(k * blocks / stages) for k in range(1, stages)), num_units]


def _rounded(value: Any) -> Any:
    """Floats to 9 decimals (ns in ms fields), so files read 2.21135488, not 2.2113548800000005."""
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def dump_plan(doc: PlanDoc, fmt: str = "json") -> str:
    """Serialise a plan as ``json`` or ``yaml`` text (floats rounded to 9 decimals)."""
    data = _rounded(doc.as_dict())
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False)
    return json.dumps(data, indent=2) + "\n"


def load_plan(path: str | Path) -> PlanDoc:
    """Read and validate a plan file (JSON or YAML)."""
    path = Path(path)
    data = load_document(path, "plan")  # JSON is YAML
    if isinstance(data, dict) and data.get("kind") == "joint":
        raise SpecError(f"{path}: kind: joint: a plan of several models (noodle.jointdoc); this reads one model's "
                        f"plan, solve a spec with model: for it")
    try:
        doc = PlanDoc.model_validate(data)
    except ValidationError as exc:
        raise SpecError(validation_message(str(path), exc)) from None
    check_consistent(doc, str(path))
    return doc


def check_consistent(doc: PlanDoc, where: str = "plan") -> None:
    """Refuse a plan whose parts disagree: stage ranges vs ``layers`` and ``units``, nodes not in ``nodes``.

    Raises:
        SpecError: naming the stage and field, with both sides of the contradiction.
    """
    ids = [n.id for n in doc.nodes]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise SpecError(f"{where}: nodes: node id {dup[0]!r} is listed twice")
    if not doc.stages:
        raise SpecError(f"{where}: stages: the plan has no stages")
    expect = 0
    for i, st in enumerate(doc.stages):
        at = f"{where}: stages[{i}]"
        if st.node not in ids:
            raise SpecError(f"{at}.node: {st.node!r} is not in the plan's nodes ({', '.join(ids) or 'none'})")
        if st.start != expect or not st.start < st.end <= len(doc.units):
            raise SpecError(
                f"{at}: range [{st.start}, {st.end}) does not continue from unit {expect} inside the "
                f"{len(doc.units)} units; stages cover the units in order without gaps"
            )
        if st.layers != doc.units[st.start:st.end]:
            want = doc.units[st.start:st.end]
            raise SpecError(
                f"{at}.layers: {_span(st.layers)} contradicts start/end [{st.start}, {st.end}), "
                f"which name {_span(want)}"
            )
        expect = st.end
    if expect != len(doc.units):
        raise SpecError(f"{where}: stages: cover units [0, {expect}) of {len(doc.units)}; the last stages are missing")
    for i, link in enumerate(doc.links):
        for end in (link.a, link.b):
            if end not in ids:
                raise SpecError(f"{where}: links[{i}]: node {end!r} is not in the plan's nodes")


def _span(names: list[str]) -> str:
    if not names:
        return "no units"
    return f"{names[0]}..{names[-1]} ({len(names)} units)" if len(names) > 1 else f"{names[0]} (1 unit)"


def _rationale(problem: Problem, ev: Evaluation, k: int, cm: CostModel) -> str:
    st = ev.stages[k]
    node = problem.cluster.node(st.node)
    usable = sorted(problem.usable_nodes(), key=lambda n: -n.compute_score)
    rank = next(i for i, n in enumerate(usable) if n.id == node.id) + 1
    speed = "the fastest" if rank == 1 else f"#{rank} by speed"
    measured = node.profile is not None and getattr(cm, "name", "") == "per-node"
    speed_note = "its own measured profile" if measured else f"compute_score {node.compute_score:g}"
    first, last = problem.units[st.start].name, problem.units[st.end - 1].name
    span = first if st.end - st.start == 1 else f"{first}..{last}"
    parts = [
        f"{node.id} ({speed_note}, {speed} of {len(usable)} usable nodes) runs {span} "
        f"({st.end - st.start} units): {st.compute_ms:.3f} ms compute + {st.out_ms:.3f} ms out"
    ]
    if problem.objective == "throughput":
        share = st.total_ms / ev.bottleneck_ms if ev.bottleneck_ms else 1.0
        parts.append("the bottleneck stage" if share >= 0.999 else f"{share:.0%} of the bottleneck")
    else:
        share = st.total_ms / ev.token_latency_ms if ev.token_latency_ms else 1.0
        parts.append(f"{share:.0%} of the token latency")
    used = st.memory_bytes / st.memory_capacity_bytes if st.memory_capacity_bytes else 0.0
    mem = f"memory {st.memory_bytes / GIB:.2f} of {node.memory_gb:g} GiB ({used:.0%})"
    if st.end < problem.num_units:
        more = cm.stage_memory_bytes(problem, node, st.start, st.end + 1)
        if more > node.memory_bytes:
            mem += f"; memory binds: adding {problem.units[st.end].name} would need {more / GIB:.2f} GiB"
    parts.append(mem)
    pins = [p for p in problem.constraints.pins if p.node == node.id]
    if pins:
        parts.append("pinned by constraints")
    return "; ".join(parts)


def plan_document(problem: Problem, result: SolveResult, cost_model: CostModel | None = None) -> PlanDoc:
    """The plan file for a solved problem (``result.plan`` must be set)."""
    if result.plan is None:
        raise SpecError("no plan to write")
    cm = cost_model or cost_model_for(problem)
    formats = ["float32"] * len(result.plan.stages)
    if problem.formats is not None and isinstance(cm, FormatCostModel):
        formats = choose_formats(problem, result.plan, cm)
        cm = FixedFormats({(s.node, s.start, s.end): f for s, f in zip(result.plan.stages, formats)})
    ev = evaluate(problem, result.plan, cm)
    stages = []
    for k, (stage, sc) in enumerate(zip(result.plan.stages, ev.stages)):
        node = problem.cluster.node(stage.node)
        why = _rationale(problem, ev, k, cm)
        if isinstance(cm, FixedFormats):
            why += "; " + format_reason(problem, node, stage.start, stage.end, formats[k], cm)
        stages.append(
            StageDoc(
                stage_id=k,
                node=node.id,
                device=node.device,
                layers=[u.name for u in problem.units[stage.start:stage.end]],
                start=stage.start,
                end=stage.end,
                compute_ms=sc.compute_ms,
                hop_ms=sc.out_ms,
                expected_latency_ms=sc.total_ms,
                memory_required_mb=sc.memory_bytes / 2**20,
                memory_available_mb=sc.memory_capacity_bytes / 2**20,
                rationale=why,
                format=formats[k],
            )
        )
    plan_nodes = result.plan.nodes
    links = []
    for a, b in zip(plan_nodes, [*plan_nodes[1:], plan_nodes[0]] if len(plan_nodes) > 1 else []):
        link = problem.cluster.link(a, b)
        links.append(LinkDoc(a=a, b=b, bandwidth_gbps=link.bandwidth_gbps, latency_ms=link.latency_ms))
    w = problem.workload
    return PlanDoc(
        name=problem.name,
        objective=problem.objective,
        objective_ms=ev.objective_ms,
        cost_model=getattr(cm, "name", type(cm).__name__),
        solver=SolverInfo(
            name=result.solver,
            status=result.status,
            solve_time_s=result.solve_time_s,
            gap=result.gap,
            bound_ms=result.bound_ms,
            note=result.note,
        ),
        predicted=_predicted(ev, w),
        stages=stages,
        units=[u.name for u in problem.units],
        workload=_workload(w, len(result.plan.stages)),
        nodes=[
            NodeDoc(id=n.id, device=n.device, memory_gb=n.memory_gb, compute_score=n.compute_score, address=n.address)
            for n in problem.cluster.nodes
        ],
        links=links,
    )


def _predicted(ev: Evaluation, w: Workload) -> Predicted:
    """The plan's figures: batched (``w.streams``) ``C / round``, else ``concurrency`` groups of ``batch_size``."""
    if ev.streams is None:
        pipe = pipeline_tokens_per_s(ev.token_latency_ms, ev.bottleneck_ms, w.concurrency, w.batch_size)
        return Predicted(token_latency_ms=ev.token_latency_ms, bottleneck_ms=ev.bottleneck_ms,
                         tokens_per_s=ev.tokens_per_s, pipeline_tokens_per_s=pipe)
    rnd = ev.round_ms
    return Predicted(token_latency_ms=ev.token_latency_ms, bottleneck_ms=ev.bottleneck_ms, tokens_per_s=ev.tokens_per_s,
                     pipeline_tokens_per_s=ev.streams * 1e3 / rnd if rnd > 0 else None, streams=ev.streams,
                     step_batch=ev.step_batch, round_ms=rnd)


def _workload(w: Workload, stages: int) -> dict[str, int]:
    """The plan's workload: batched, the step batch and batches of this plan plus ``streams``."""
    out = {"prompt_tokens": w.prompt_tokens, "max_new_tokens": w.max_new_tokens, "batch_size": w.step_batch(stages),
           "concurrency": w.groups(stages)}
    if w.streams is not None:
        out["streams"] = w.streams
    return out
