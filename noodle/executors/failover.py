"""What a coordinator does when a node stops answering: retry, then move or merge its stage.

Two pure pieces, shared by the distributed executors:

- :class:`RetryPolicy`: how often and how patiently a failed call is retried
  (exponential backoff) before the node is declared gone.
- :func:`merge_stage`: the plan without a dead node, its units merged into a
  neighbouring stage that has room for them.

Why merge rather than re-solve: a plan file carries units, nodes, links and each
stage's measured-by-model figures (``compute_ms``, ``memory_required_mb``), but
not the per-unit costs a :class:`~noodle.types.Problem` needs. Rebuilding unit
costs by spreading a stage's ``compute_ms`` evenly over its units would feed the
solver invented numbers and hand back a plan that looks optimal and is not. The
honest move with what the plan knows is local: a spare worker takes the dead
stage as it is (same units, so nothing else changes), or, without a spare, a
neighbour whose node has memory for both stages (by the plan's own memory
figures) takes the dead stage's units. The merged plan's predictions are the sum
of the two stages' and it says so in ``solver.note``; to get an optimal plan for
the smaller cluster, re-run ``noodle solve`` with the node in ``exclude``.
"""

from __future__ import annotations

from dataclasses import dataclass

from noodle.errors import ExecutorError, SpecError
from noodle.plandoc import PlanDoc, Predicted, SolverInfo, StageDoc

__all__ = ["RetryPolicy", "merge_stage", "merge_target"]


@dataclass(frozen=True)
class RetryPolicy:
    """Deadlines and retries of calls to workers.

    Attributes:
        step_timeout_s: a stage's reply to one step must come within this (prefill included).
        health_timeout_s: deadline of a health check.
        attempts: calls tried per step before the node is declared gone (first call included).
        backoff_s: wait before the first retry; doubled before each further one.
        connect_s: how long the first health check of a worker is retried (with backoff) at start-up.
    """

    step_timeout_s: float = 60.0
    health_timeout_s: float = 2.0
    attempts: int = 3
    backoff_s: float = 0.1
    connect_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("step_timeout_s", "health_timeout_s", "backoff_s", "connect_s"):
            value = getattr(self, name)
            if not value >= 0 or (name != "backoff_s" and value == 0):
                raise SpecError(f"retry policy: {name} must be > 0, got {value}")
        if self.attempts < 1:
            raise SpecError(f"retry policy: attempts must be >= 1, got {self.attempts}")

    def delays(self) -> list[float]:
        """Seconds to wait before each retry (``attempts - 1`` of them)."""
        return [self.backoff_s * 2**i for i in range(self.attempts - 1)]


def merge_target(plan: PlanDoc, index: int) -> int:
    """Index of the neighbouring stage that should take stage ``index``'s units.

    The neighbour must sit on another node, and that node must have room for both
    stages by the plan's memory figures; among those, the one with the most room
    left is chosen.

    Raises:
        ExecutorError: no neighbour has room, with the numbers.
    """
    stages = plan.stages
    if not 0 <= index < len(stages):
        raise ValueError(f"stage {index} is not in a plan of {len(stages)} stages")
    dead = stages[index]
    if len(stages) == 1:
        raise ExecutorError(f"failover: {dead.node} held the only stage; there is no neighbour to take its units")
    options: list[tuple[float, int]] = []
    refused: list[str] = []
    for j in (index - 1, index + 1):
        if not 0 <= j < len(stages) or stages[j].node == dead.node:
            continue
        nb = stages[j]
        need = nb.memory_required_mb + dead.memory_required_mb
        room = nb.memory_available_mb - need
        if room >= 0:
            options.append((room, j))
        else:
            refused.append(
                f"{nb.node} would need {need:.0f} MiB for units [{min(nb.start, dead.start)}, "
                f"{max(nb.end, dead.end)}) and has {nb.memory_available_mb:.0f} MiB"
            )
    if not options:
        why = "; ".join(refused) or "no neighbour on another node"
        raise ExecutorError(
            f"failover: no stage next to {dead.node} (units [{dead.start}, {dead.end})) has room to take its units: "
            f"{why}; start a spare worker (--spare) or solve again without {dead.node}"
        )
    return max(options)[1]


def merge_stage(plan: PlanDoc, index: int, into: int | None = None) -> PlanDoc:
    """``plan`` with stage ``index`` merged into its neighbour ``into`` (default: :func:`merge_target`).

    The merged stage keeps the neighbour's node; its predicted compute is the sum
    of both stages' and its hop is the later stage's. Stage ids are renumbered.
    """
    into = merge_target(plan, index) if into is None else into
    if abs(into - index) != 1:
        raise ValueError(f"stage {into} is not next to stage {index}")
    stages = list(plan.stages)
    dead, nb = stages[index], stages[into]
    first, last = (dead, nb) if index < into else (nb, dead)
    compute = dead.compute_ms + nb.compute_ms
    merged = StageDoc(
        stage_id=0,
        node=nb.node,
        device=nb.device,
        layers=[*first.layers, *last.layers],
        start=first.start,
        end=last.end,
        compute_ms=compute,
        hop_ms=last.hop_ms,
        expected_latency_ms=compute + last.hop_ms,
        memory_required_mb=dead.memory_required_mb + nb.memory_required_mb,
        memory_available_mb=nb.memory_available_mb,
        rationale=f"failover: {dead.node} stopped answering; {nb.node} took its units [{dead.start}, {dead.end})",
    )
    lo = min(index, into)
    new = [*stages[:lo], merged, *stages[lo + 2 :]]
    new = [s.model_copy(update={"stage_id": i}) for i, s in enumerate(new)]
    latency = sum(s.expected_latency_ms for s in new)
    bottleneck = max(s.expected_latency_ms for s in new)
    objective_ms = bottleneck if plan.objective == "throughput" else latency
    note = f"{plan.solver.note}; " if plan.solver.note else ""
    return plan.model_copy(
        update={
            "stages": new,
            "objective_ms": objective_ms,
            "solver": SolverInfo(
                name=plan.solver.name,
                status="feasible",
                solve_time_s=plan.solver.solve_time_s,
                note=f"{note}failover merged stage {index} ({dead.node}) into {nb.node}; not re-solved",
            ),
            "predicted": Predicted(
                token_latency_ms=latency,
                bottleneck_ms=bottleneck,
                tokens_per_s=1e3 / objective_ms if objective_ms > 0 else 0.0,
            ),
            "nodes": [n for n in plan.nodes if n.id != dead.node or any(s.node == n.id for s in new)],
        }
    )
