"""The joint plan file: several models' pipelines on one cluster, each stage labelled with its model.

Written by ``noodle solve`` for a spec with ``models:`` (a single-model spec still writes :mod:`noodle.plandoc`'s
file, unchanged). ``kind: joint`` tells the two apart; ``objective_ms`` is the round ``U`` of
:mod:`noodle.solvers.joint.model` and each model's ``tokens_per_s`` is ``1000 * weight / U``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from noodle.docfile import load_document, validation_message
from noodle.errors import SpecError

from noodle.graph.costmodel import cost_model_for, evaluate
from noodle.joint import JointProblem
from noodle.plandoc import NodeDoc, PlanDoc, Predicted, SolverInfo, StageDoc, check_consistent
from noodle.solvers.joint.run import JointResult
from noodle.types import GIB

__all__ = ["JointStageDoc", "JointModelDoc", "JointNodeDoc", "JointPlanDoc", "joint_document", "dump_joint_plan",
           "load_joint_plan", "model_plans"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class JointStageDoc(_Frozen):
    model: str = Field(description="the model this stage belongs to")
    stage_id: int = Field(ge=0, description="its position in that model's pipeline")
    node: str
    device: str
    layers: list[str]
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    compute_ms: float = Field(ge=0, description="one step of the stage alone on its node")
    hop_ms: float = Field(ge=0, description="handing its output on (to the next stage, or the token back)")
    round_share_ms: float = Field(ge=0, description="its part of the node's round: (weight / batch) x (compute + hop)")
    memory_required_mb: float


class JointModelDoc(_Frozen):
    name: str
    weight: float = Field(gt=0, description="its share (or its required tokens/s when required)")
    required: bool
    tokens_per_s: float = Field(ge=0)
    units: list[str]
    workload: dict[str, int]


class JointNodeDoc(_Frozen):
    id: str
    device: str
    round_ms: float = Field(ge=0, description="sum of the round shares of the stages it holds")
    memory_used_mb: float
    memory_available_mb: float
    compute_score: float = Field(1.0, gt=0, description="its speed relative to the reference (the spec's)")


class JointPlanDoc(_Frozen):
    version: int = 1
    kind: Literal["joint"] = "joint"
    name: str
    objective: Literal["weighted-min-throughput", "required-tokens-per-s"]
    objective_ms: float = Field(description="U: the busiest node's round, in which model m gains weight_m tokens")
    solver: SolverInfo
    models: list[JointModelDoc]
    stages: list[JointStageDoc]
    nodes: list[JointNodeDoc]


def joint_document(jp: JointProblem, result: JointResult) -> JointPlanDoc:
    """The plan file of a joint result: every stage priced under its model's cost model."""
    stages, models = [], []
    round_ms: dict[str, float] = {}
    used: dict[str, int] = {}
    for m, plan, rate in zip(jp.models, result.plan.plans, result.tokens_per_s):
        p = m.problem
        ev = evaluate(p, plan, cost_model_for(p))
        coef = m.weight / m.tokens_per_step
        for k, st in enumerate(ev.stages):
            node = p.cluster.node(st.node)
            share = coef * st.total_ms
            round_ms[st.node] = round_ms.get(st.node, 0.0) + share
            used[st.node] = used.get(st.node, 0) + st.memory_bytes
            stages.append(JointStageDoc(
                model=m.name, stage_id=k, node=st.node, device=node.device,
                layers=[u.name for u in p.units[st.start:st.end]], start=st.start, end=st.end,
                compute_ms=st.compute_ms, hop_ms=st.out_ms, round_share_ms=share,
                memory_required_mb=st.memory_bytes / 2**20))
        w = p.workload
        models.append(JointModelDoc(name=m.name, weight=m.weight, required=m.required, tokens_per_s=rate,
                                    units=[u.name for u in p.units],
                                    workload={"prompt_tokens": w.prompt_tokens, "max_new_tokens": w.max_new_tokens,
                                              "batch_size": w.batch_size, "concurrency": w.concurrency}))
    nodes = [JointNodeDoc(id=nd.id, device=nd.device, round_ms=round_ms.get(nd.id, 0.0),
                          memory_used_mb=used.get(nd.id, 0) / 2**20, memory_available_mb=nd.memory_gb * GIB / 2**20, compute_score=nd.compute_score)
             for nd in jp.cluster.nodes]
    info = SolverInfo(name=result.solver, status=result.status, solve_time_s=result.solve_time_s, gap=result.gap,
                      bound_ms=result.bound_ms, note=result.note)
    return JointPlanDoc(name=jp.name, objective="required-tokens-per-s" if jp.required else "weighted-min-throughput",
                        objective_ms=result.objective_ms, solver=info, models=models, stages=stages, nodes=nodes)


def dump_joint_plan(doc: JointPlanDoc, fmt: str = "json") -> str:
    """The document as JSON or YAML text."""
    data: dict[str, Any] = doc.model_dump(mode="json")
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False)
    return json.dumps(data, indent=2) + "\n"


def load_joint_plan(path: str | Path) -> JointPlanDoc:
    """Read and validate a joint plan file (``kind: joint``, from ``noodle solve`` on a spec with ``models:``)."""
    path = Path(path)
    data = load_document(path, "plan")
    if not isinstance(data, dict) or data.get("kind") != "joint":
        what = "a spec (give it with --spec)" if isinstance(data, dict) and "cluster" in data else "not a joint plan"
        raise SpecError(f"{path}: kind: {what}; serving several models takes a joint plan (kind: joint, from "
                        "`noodle solve` on a spec with models:)")  # fmt: skip
    try:
        doc = JointPlanDoc.model_validate(data)
    except ValidationError as exc:
        raise SpecError(validation_message(str(path), exc)) from None
    model_plans(doc, str(path))  # every model's stages chain its units on the plan's nodes
    return doc


def model_plans(doc: JointPlanDoc, where: str = "plan") -> dict[str, PlanDoc]:
    """Each model's own pipeline as a one-model plan (what an executor runs), by model name.

    A stage keeps its step and hop; the predicted tokens/s is the model's rate in the joint plan (its share of the
    shared nodes' time), not what the pipeline would reach alone.
    """
    nodes = {n.id: n for n in doc.nodes}
    out = {}
    for m in doc.models:
        stages = []
        for st in (s for s in doc.stages if s.model == m.name):
            node = nodes.get(st.node)
            if node is None:
                raise SpecError(f"{where}: stages: {m.name} stage {st.stage_id}: node {st.node!r} is not in the "
                                f"plan's nodes ({', '.join(nodes) or 'none'})")  # fmt: skip
            stages.append(StageDoc(
                stage_id=st.stage_id, node=st.node, device=st.device, layers=st.layers, start=st.start, end=st.end,
                compute_ms=st.compute_ms, hop_ms=st.hop_ms, expected_latency_ms=st.compute_ms + st.hop_ms,
                memory_required_mb=st.memory_required_mb, memory_available_mb=node.memory_available_mb,
                rationale=f"joint plan {doc.name}: {st.round_share_ms:.3f} ms of {st.node}'s {node.round_ms:.3f} ms "
                          "round, shared with the other models placed there"))  # fmt: skip
        if not stages:
            raise SpecError(f"{where}: stages: none for model {m.name!r}")
        steps = [s.expected_latency_ms for s in stages]
        plan = PlanDoc(
            name=f"{doc.name}/{m.name}", objective=doc.objective, objective_ms=doc.objective_ms, cost_model="joint",
            solver=doc.solver, stages=stages, units=m.units, workload=m.workload,
            predicted=Predicted(token_latency_ms=sum(steps), bottleneck_ms=max(steps), tokens_per_s=m.tokens_per_s,
                                pipeline_tokens_per_s=m.tokens_per_s),
            nodes=[NodeDoc(id=n.id, device=n.device, memory_gb=max(n.memory_available_mb, 1e-6) / 1024,
                           compute_score=n.compute_score) for n in doc.nodes])  # fmt: skip
        check_consistent(plan, f"{where}: model {m.name}")
        out[m.name] = plan
    return out
