"""The plan file (``plan.json`` / ``plan.yaml``): what ``noodle solve`` writes and executors read.

A strict, frozen pydantic model because it crosses a file boundary. The top-level
keys ``objective``, ``objective_ms``, ``solver``, ``predicted`` and ``stages`` are a
contract with users; the rest (``units``, ``workload``, ``nodes``, ``links``) lets
executors check the plan against a model and emulate the planned cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from noodle.errors import SpecError

__all__ = ["SolverInfo", "Predicted", "StageDoc", "NodeDoc", "LinkDoc", "PlanDoc", "load_plan", "dump_plan"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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


class StageDoc(_Frozen):
    stage_id: int
    node: str
    device: str
    layers: list[str]
    start: int
    end: int
    compute_ms: float
    hop_ms: float = Field(description="time to hand this stage's output on (to the next stage, or the token back)")
    expected_latency_ms: float = Field(description="compute_ms + hop_ms")
    memory_required_mb: float
    memory_available_mb: float
    rationale: str


class NodeDoc(_Frozen):
    id: str
    device: str
    memory_gb: float
    compute_score: float
    address: str | None = None


class LinkDoc(_Frozen):
    a: str
    b: str
    bandwidth_gbps: float
    latency_ms: float


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
    workload: dict[str, int]
    nodes: list[NodeDoc]
    links: list[LinkDoc] = Field(default_factory=list, description="links between consecutive stages")

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def dump_plan(doc: PlanDoc, fmt: str = "json") -> str:
    """Serialise a plan as ``json`` or ``yaml`` text."""
    data = doc.as_dict()
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False)
    return json.dumps(data, indent=2) + "\n"


def load_plan(path: str | Path) -> PlanDoc:
    """Read and validate a plan file (JSON or YAML)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read plan ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid JSON/YAML ({exc})") from None
    try:
        return PlanDoc.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise SpecError(f"{path}: {where}: {err['msg']}") from None
