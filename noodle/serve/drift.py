"""Adaptive costs: each stage's measured compute time against the plan's prediction, fed back into the cost table.

Stage ``k`` of the served plan holds units ``[s, e)`` on node ``v``. Each fresh window of at
least ``min_steps`` decode steps gives ``m_k``, the median of the worker's own compute time of
those steps (``t_out_ns - t_in_ns`` of its ForwardReply: no network, no coordinator queueing).
The plan prices a stage's step at the plan's step batch ``b*`` (``predicted.step_batch`` under
continuous batching, else one sequence), while a served step carries however many sequences were
running (the lane records each decode step's batch ``b_j``). Each step's time is first brought to
``b*`` along the node's join-time batch curve ``T_v(s, e, b)`` (the table the planner priced it with,
:func:`noodle.serve.registry.table_ms`): ``m_j * T_v(s, e, b*) / T_v(s, e, b_j)``, so a window of
batches of 3 is not read as a stage 3x slower than its batch-1 figure. ``m_k`` is the median of those.
With ``r_k = T_v(s, e, b*)`` the node's join-time cost of ``[s, e)`` and ``p_k`` the plan's predicted
compute of the stage (at ``b*``)::

    ratio       = m_k / r_k                                  how far the join-time table is off
    f_v[s, e]   = ratio                                      on the first window
                = (1 - alpha) * f_v[s, e] + alpha * ratio    after (EWMA, alpha = 0.3)
    error_k     = m_k / p_k - 1                              the plan's prediction error
    est_error_k = m_k / (r_k * f_before) - 1                 the corrected estimate's error one window ahead

A stage whose ``|error_k|`` exceeds ``threshold`` (0.15) in ``sustain`` (3) consecutive windows
is reported by :meth:`PredictionWatch.observe`; the controller re-solves with the corrected
table (:func:`noodle.serve.registry.corrected`: each unit of ``[s, e)`` costs its join-time
figure times ``f_v[s, e]``) and switches only when the layout changes; otherwise the plan's
predictions are replaced by the corrected ones. A throttled node and a node whose join-time
table was wrong look the same here: the measured time leaves the prediction and stays away.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["StageWindow", "StageError", "PredictionWatch", "ewma", "fresh_window"]

Key = tuple[str, int, int]  # (node, start, end)
T = TypeVar("T")


def ewma(old: float | None, value: float, alpha: float) -> float:
    """Exponentially weighted moving average: ``value`` when there is no ``old`` yet."""
    return value if old is None else (1.0 - alpha) * old + alpha * value


def fresh_window(samples: Sequence[T], total: int, seen: int, min_steps: int) -> list[T] | None:
    """The samples recorded since ``seen`` of ``total`` (``samples`` holds the most recent ones); None when too few."""
    fresh = total - seen
    if fresh < min_steps:
        return None
    return list(samples)[-min(fresh, len(samples)):]


@dataclass(frozen=True)
class StageWindow:
    """One stage's fresh window: the worker's measured compute (median, ms), the plan's and the table's figures,
    all at ``batch`` sequences per step (the plan's step batch)."""

    index: int
    node: str
    start: int
    end: int
    measured_ms: float
    predicted_ms: float
    table_ms: float
    batch: int = 1


@dataclass(frozen=True)
class StageError:
    """The last window of a stage: measured vs predicted, and the correction it fed back."""

    index: int
    node: str
    start: int
    end: int
    measured_ms: float
    predicted_ms: float
    corrected_ms: float  # the table's cost of the range times the new factor
    error: float  # measured / the plan's prediction - 1
    corrected_error: float  # measured / the corrected estimate before this window - 1
    factor: float
    windows: int
    batch: int = 1  # the step batch the figures are at

    def as_dict(self) -> dict[str, float | int | str]:
        return {"stage": self.index, "node": self.node, "units": f"[{self.start}, {self.end})", "batch": self.batch,
                "measured_ms": self.measured_ms, "predicted_ms": self.predicted_ms, "corrected_ms": self.corrected_ms,
                "error_pct": 100 * self.error, "corrected_error_pct": 100 * self.corrected_error,
                "correction": self.factor, "windows": self.windows}  # fmt: skip


@dataclass
class PredictionWatch:
    threshold: float = 0.15
    sustain: int = 3
    min_steps: int = 20
    alpha: float = 0.3
    errors: dict[int, StageError] = field(default_factory=dict)
    _strikes: dict[int, int] = field(default_factory=dict)

    def reset(self) -> None:
        """Forget the strikes and the last errors (a new plan: new stages)."""
        self.errors.clear()
        self._strikes.clear()

    def observe(self, windows: Sequence[StageWindow],
                factors: Mapping[Key, float]) -> tuple[dict[Key, float], list[StageError]]:  # fmt: skip
        """Feed fresh windows; ``factors``: the current correction per (node, start, end).

        Returns the new factors to store and the stages whose error stayed over the threshold
        for ``sustain`` windows (their strikes restart).
        """
        updates: dict[Key, float] = {}
        drifted = []
        for w in windows:
            if w.measured_ms <= 0 or w.table_ms <= 0 or w.predicted_ms <= 0:
                continue
            key = (w.node, w.start, w.end)
            old = factors.get(key)
            factor = ewma(old, w.measured_ms / w.table_ms, self.alpha)
            updates[key] = factor
            before = w.table_ms * (old if old is not None else 1.0)
            prev = self.errors.get(w.index)
            err = StageError(w.index, w.node, w.start, w.end, w.measured_ms, w.predicted_ms, w.table_ms * factor,
                             w.measured_ms / w.predicted_ms - 1.0, w.measured_ms / before - 1.0, factor,
                             (prev.windows if prev is not None else 0) + 1, w.batch)  # fmt: skip
            self.errors[w.index] = err
            if abs(err.error) > self.threshold:
                self._strikes[w.index] = self._strikes.get(w.index, 0) + 1
                if self._strikes[w.index] >= self.sustain:
                    drifted.append(err)
                    self._strikes[w.index] = 0
            else:
                self._strikes[w.index] = 0
        return updates, drifted
