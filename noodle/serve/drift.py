"""Drift: a stage whose measured step time moved more than a threshold from where it started.

:class:`DriftWatch` takes the first ``min_steps`` steps of each stage after a (re-)plan as its
baseline (its measured p50 step time: the plan's own figure is not the yardstick, since a grpc
step also pays the coordinator's round trip the planner does not see), then compares each
fresh window: a stage whose p50 differs from its baseline by more than ``threshold`` (15 %)
in ``sustain`` consecutive fresh windows has drifted (a throttling or overloaded node), and
:meth:`DriftWatch.observe` returns it with the factor (measured / baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DriftWatch"]


@dataclass
class DriftWatch:
    threshold: float = 0.15
    sustain: int = 3
    min_steps: int = 20
    baseline: dict[int, float] = field(default_factory=dict)
    _strikes: dict[int, int] = field(default_factory=dict)
    _seen: dict[int, int] = field(default_factory=dict)

    def reset(self) -> None:
        """Forget the baselines (after a switch to a new plan)."""
        self.baseline.clear()
        self._strikes.clear()
        self._seen.clear()

    def observe(self, stages: Sequence[Any]) -> list[tuple[int, float]]:
        """Feed one ``Pipeline.stats().stages``; returns ``[(stage index, measured / baseline)]`` that drifted."""
        out = []
        for i, s in enumerate(stages):
            steps, p50 = int(getattr(s, "steps", 0)), float(getattr(s, "step_ms_p50", 0.0))
            if p50 <= 0 or steps - self._seen.get(i, 0) < self.min_steps:
                continue  # not enough fresh steps since the last look
            self._seen[i] = steps
            base = self.baseline.get(i)
            if base is None:
                self.baseline[i] = p50
                continue
            factor = p50 / base
            if abs(factor - 1.0) > self.threshold:
                self._strikes[i] = self._strikes.get(i, 0) + 1
                if self._strikes[i] >= self.sustain:
                    out.append((i, factor))
                    self._strikes[i] = 0
                    self.baseline[i] = p50
            else:
                self._strikes[i] = 0
        return out
