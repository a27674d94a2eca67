"""Frozen types for several models placed jointly on one cluster (a spec with ``models:``).

Each model is a plain single-model :class:`~noodle.types.Problem` (its unit chain, its workload) on the
*same* cluster, plus its share of the throughput: a ``weight``, or the ``required_tokens_per_s`` it must
get. A :class:`JointPlan` gives each model its own pipeline (a :class:`~noodle.types.Plan`); nodes are
shared: a node may hold stages of several models (at most one stage of each). The sharing model and the
objective are written out in :mod:`noodle.solvers.joint`.
"""

from __future__ import annotations

from dataclasses import dataclass

from noodle.errors import SpecError
from noodle.types import Cluster, Plan, Problem

__all__ = ["JointModel", "JointProblem", "JointPlan"]


@dataclass(frozen=True)
class JointModel:
    """One model of a joint problem.

    Attributes:
        name: the model's name (unique in the problem; the plan file labels its stages with it).
        problem: its unit chain and workload on the shared cluster (objective ``throughput``).
        weight: its share: the planner maximises ``min over models of tokens_per_s / weight``; with
            ``required`` set, the weight *is* the required tokens/s.
        required: True when ``weight`` is a required tokens/s (the plan must reach it), not a relative share.
    """

    name: str
    problem: Problem
    weight: float = 1.0
    required: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.weight < float("inf"):
            raise SpecError(f"models: {self.name}: weight {self.weight}; a finite number above 0")
        if self.problem.workload.batched:
            raise SpecError(f"models: {self.name}: workload.streams: joint placement prices fixed groups; give "
                            f"batch_size and concurrency instead of streams")

    @property
    def tokens_per_step(self) -> int:
        """Tokens one step of a stage produces: the sequences it steps at once (the workload's batch)."""
        return self.problem.workload.batch_size


@dataclass(frozen=True)
class JointProblem:
    """Several models on one shared cluster (every model's problem holds the same cluster and excludes)."""

    models: tuple[JointModel, ...]
    name: str = "joint"

    def __post_init__(self) -> None:
        if not self.models:
            raise SpecError("models: a joint problem needs at least one model")
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SpecError(f"models: duplicate model names {', '.join(dup)}")
        first = self.models[0].problem
        for m in self.models[1:]:
            if m.problem.cluster != first.cluster or m.problem.constraints.exclude != first.constraints.exclude:
                raise SpecError(f"models: {m.name}: every model is placed on the same cluster")
        if len({m.required for m in self.models}) > 1:
            raise SpecError("models: give every model a weight, or every model a required_tokens_per_s, not a mix")

    @property
    def cluster(self) -> Cluster:
        return self.models[0].problem.cluster

    @property
    def required(self) -> bool:
        return self.models[0].required


@dataclass(frozen=True)
class JointPlan:
    """One pipeline per model, in the order of :attr:`JointProblem.models`."""

    plans: tuple[Plan, ...]
