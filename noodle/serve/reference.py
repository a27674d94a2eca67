"""Whether the plan's measured reference still tells the truth: observed stage steps against the planned ones.

A plan is priced from a reference measurement (``noodle serve --model`` times this machine for a fraction of a
second at start-up; a spec's ``compute_score`` or profile is someone's earlier measurement). When a stage's
observed step time stays more than ``FAR`` times away from what the plan predicted for it (slower or faster),
every prediction on the status page is off by as much: :class:`ReferenceCheck` says so once per plan and stage,
as a warning event (which is also a log line), after ``SAMPLES_NEEDED`` consecutive samples agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["FAR", "SAMPLES_NEEDED", "ReferenceCheck", "far_stages"]

FAR = 2.0  # observed / planned beyond this factor (either way) is "far"
SAMPLES_NEEDED = 3  # consecutive 1 s samples before warning: one slow step (a load spike) is not a verdict


def far_stages(rows: Sequence[dict[str, Any]], far: float = FAR) -> list[tuple[dict[str, Any], float]]:
    """The stage rows (:func:`noodle.serve.metrics.stage_rows`) whose measured step is ``far`` x off the plan."""
    out = []
    for row in rows:
        planned, seen = float(row.get("planned_ms") or 0.0), float(row.get("step_ms_p50") or 0.0)
        if planned > 0 and seen > 0:
            ratio = seen / planned
            if ratio > far or ratio < 1.0 / far:
                out.append((row, ratio))
    return out


class ReferenceCheck:
    """Warns once per plan and stage when the observed steps stay far from the planned ones.

    Args:
        warn: called with the message (the runtime's ``events.add("warning", ...)``: an event and a log line).
    """

    def __init__(self, warn: Callable[[str], None]) -> None:
        self._warn = warn
        self._plan_key: object = None
        self._streak: dict[int, int] = {}
        self._warned: set[int] = set()

    def observe(self, plan: Any, rows: Sequence[dict[str, Any]]) -> list[str]:
        """Take one sample of the stage rows under ``plan``; returns the warnings given now."""
        key = id(getattr(plan, "current", plan))
        if key != self._plan_key:  # a new plan (a re-plan) is judged afresh
            self._plan_key, self._streak, self._warned = key, {}, set()
        far = {int(row["stage"]): (row, ratio) for row, ratio in far_stages(rows)}
        self._streak = {s: self._streak.get(s, 0) + 1 for s in far}
        given = []
        for stage, (row, ratio) in sorted(far.items()):
            if self._streak[stage] >= SAMPLES_NEEDED and stage not in self._warned:
                self._warned.add(stage)
                way = "slower" if ratio > 1 else "faster"
                msg = (f"plan: stage {stage} on {row['node']} ({row['units']}) steps in {row['step_ms_p50']:.1f} ms, "
                       f"the plan predicted {row['planned_ms']:.1f} ms ({ratio:.2f}x, {way}): the measured reference "
                       f"the plan was priced from is more than {FAR:g}x off here, so its predictions are too; "
                       "plan from a profile of this machine (`noodle profile`, then --spec) for numbers that hold")
                self._warn(msg)
                given.append(msg)
        return given
