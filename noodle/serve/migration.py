"""Is a re-plan worth its move? The cost of switching layouts, weighed against the gain over a horizon.

A switch is not free: units that change node must be loaded there (a worker keeps the stages it
already holds, so only moved units cost a load), and requests are held while the old pipeline
drains and the new one opens. :func:`weigh` compares, for the fresh cost tables:

* ``current``: the layout being served, re-evaluated with the fresh figures (:func:`layout_under`),
  so a node that slowed down counts against the plan that uses it;
* ``best``: what the solver returns now.

With ``gain = best / current - 1``, ``move_s = moved bytes / link bandwidth + hold_s`` (the
spec's link figure bounds how fast weights reach a node; ``hold_s`` is how long the last switch
held requests) the switch happens only when both

1. ``gain > threshold`` (hysteresis: a plan within the threshold of the best keeps the layout), and
2. ``(best - current) x (horizon_s - move_s) > current x move_s``: the extra tokens served over
   ``horizon_s`` pay for the tokens not served while moving.

Everything here is a pure function of plans and numbers; the controller calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from noodle.errors import NoodleError
from noodle.plandoc import PlanDoc, plan_document
from noodle.solvers.base import SolveResult
from noodle.types import Plan, Problem, Stage

__all__ = ["SwitchCost", "Verdict", "moved_units", "switch_cost", "weigh", "layout_under"]


@dataclass(frozen=True)
class SwitchCost:
    """What moving from one layout to another costs."""

    moved_units: tuple[int, ...]
    moved_bytes: int
    load_s: float
    hold_s: float

    @property
    def seconds(self) -> float:
        return self.load_s + self.hold_s


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`weigh`; ``why`` is one line for the status page."""

    switch: bool
    gain: float
    current_tps: float
    best_tps: float
    cost: SwitchCost
    gained_tokens: float
    lost_tokens: float
    why: str


def _owners(stages: Sequence[object]) -> dict[int, str]:
    return {i: str(getattr(s, "node")) for s in stages for i in range(int(getattr(s, "start")), int(getattr(s, "end")))}


def moved_units(before: Sequence[object], after: Sequence[object]) -> tuple[int, ...]:
    """Units whose node differs between two stage lists (anything with ``node``, ``start``, ``end``)."""
    old, new = _owners(before), _owners(after)
    return tuple(sorted(i for i, node in new.items() if old.get(i) != node))


def switch_cost(before: PlanDoc | None, after: PlanDoc, unit_bytes: Sequence[int], *, bandwidth_gbps: float,
                hold_s: float) -> SwitchCost:  # fmt: skip
    """Units ``after`` moves relative to ``before``, their weight bytes, and the seconds to load them plus ``hold_s``."""
    moved = moved_units(before.stages if before is not None else [], after.stages)
    nbytes = int(sum(unit_bytes[i] for i in moved))
    load_s = nbytes * 8.0 / (bandwidth_gbps * 1e9) if bandwidth_gbps > 0 else 0.0
    return SwitchCost(moved, nbytes, load_s, max(0.0, hold_s))


def weigh(current_tps: float, best_tps: float, cost: SwitchCost, *, threshold: float, horizon_s: float) -> Verdict:
    """Switch only when the gain passes ``threshold`` and pays for the move within ``horizon_s`` (module docstring)."""
    gain = best_tps / current_tps - 1.0 if current_tps > 0 else float("inf")
    move_s = cost.seconds
    gained = max(0.0, best_tps - current_tps) * max(0.0, horizon_s - move_s)
    lost = current_tps * move_s
    moved = f"moves {len(cost.moved_units)} unit(s), {cost.moved_bytes / 2**20:.1f} MiB, ~{move_s:.2f} s"
    figures = f"{current_tps:.1f} -> {best_tps:.1f} predicted tokens/s ({gain:+.1%}); {moved}"
    if not cost.moved_units:
        return Verdict(False, gain, current_tps, best_tps, cost, 0.0, 0.0, f"the best plan is the current layout ({figures})")
    if gain <= threshold:
        why = f"{figures}: within the {threshold:.0%} threshold of the current layout"
        return Verdict(False, gain, current_tps, best_tps, cost, gained, lost, why)
    if gained <= lost:
        why = (f"{figures}: over {horizon_s:g} s it would serve {gained:.0f} more tokens but lose {lost:.0f} "
               "while moving")  # fmt: skip
        return Verdict(False, gain, current_tps, best_tps, cost, gained, lost, why)
    why = f"{figures}: +{gained:.0f} tokens over {horizon_s:g} s for {lost:.0f} lost while moving"
    return Verdict(True, gain, current_tps, best_tps, cost, gained, lost, why)


def layout_under(problem: Problem, plan: PlanDoc | None) -> PlanDoc | None:
    """``plan``'s layout evaluated with ``problem``'s (fresh) figures; None when it cannot run there any more."""
    if plan is None or not plan.stages:
        return None
    ids = set(problem.cluster.node_ids)
    if any(s.node not in ids for s in plan.stages) or plan.stages[-1].end != len(problem.units):
        return None
    layout = Plan(tuple(Stage(s.node, s.start, s.end) for s in plan.stages))
    try:
        return plan_document(problem, SolveResult("current", "feasible", layout, None, None, 0.0))
    except NoodleError:
        return None
