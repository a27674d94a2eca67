"""The joint plan file: several models' pipelines on one cluster, each stage labelled with its model.

Written by ``noodle solve`` for a spec with ``models:`` (a single-model spec still writes :mod:`noodle.plandoc`'s
file, unchanged). ``kind: joint`` tells the two apart; ``objective_ms`` is the round ``U`` of
:mod:`noodle.solvers.joint.model` and each model's ``tokens_per_s`` is ``1000 * weight / U``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from noodle.graph.costmodel import cost_model_for, evaluate
from noodle.joint import JointProblem
from noodle.plandoc import SolverInfo
from noodle.solvers.joint.run import JointResult
from noodle.types import GIB

__all__ = ["JointStageDoc", "JointModelDoc", "JointNodeDoc", "JointPlanDoc", "joint_document", "dump_joint_plan"]


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
                          memory_used_mb=used.get(nd.id, 0) / 2**20, memory_available_mb=nd.memory_gb * GIB / 2**20)
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
