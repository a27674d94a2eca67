"""An emulated slowdown for tests and demos: ``noodle worker --emulate-slowdown F --slowdown-after-s T``.

A real device that throttles (heat, a shared GPU, a laptop on battery) keeps computing the same
numbers, only slower. :class:`Throttle` emulates that honestly: once ``after_s`` seconds have
passed since the worker's first stage step, every step sleeps ``(factor - 1) x`` its own measured
compute time, inside the worker's compute lock, so the step takes ``factor x`` as long, the
reply's timings include it, and steps queued behind it wait as they would on a slow device. The
tokens do not change. This is an emulation knob, not a feature: no real deployment sets it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from noodle.errors import SpecError

__all__ = ["Throttle", "check_slowdown", "PROBE_PREFIX"]


def check_slowdown(factor: float, after_s: float) -> None:
    """Refuse a factor below 1 or not finite, and a negative or infinite delay (``--emulate-slowdown`` flags)."""
    if not (math.isfinite(factor) and 1.0 <= factor <= 1000.0):
        raise SpecError(f"--emulate-slowdown: must be a finite factor in [1, 1000] (1: no slowdown), got {factor:g}")
    if not (math.isfinite(after_s) and 0.0 <= after_s <= 1e6):
        raise SpecError(f"--slowdown-after-s: must be a finite number of seconds in [0, 1e6], got {after_s:g}")


PROBE_PREFIX = "verify-"  # sessions of the coordinator's timed join probe (noodle.serve.verify)


class Throttle:
    """Sleeps after each stage step once active (see the module docstring); a no-op at ``factor`` 1."""

    def __init__(self, factor: float = 1.0, after_s: float = 0.0, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
        check_slowdown(factor, after_s)
        self.factor = factor
        self.after_s = after_s
        self._clock = clock
        self._sleep = sleep
        self._first: float | None = None
        self._announced = False
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.factor > 1.0

    def active(self) -> bool:
        """True once ``after_s`` seconds have passed since the first step."""
        return self.enabled and self._first is not None and self._clock() - self._first >= self.after_s

    def extra_s(self, compute_s: float, *, starts_clock: bool = True) -> float:
        """Seconds a step that computed for ``compute_s`` must still sleep now (0 when not active).

        ``starts_clock`` False (a coordinator's timed join probe, :data:`PROBE_PREFIX`): the step does not start
        the ``after_s`` clock, so a throttle set for mid-run begins after serving starts, not at the join.
        """
        if not self.enabled:
            return 0.0
        with self._lock:
            if self._first is None:
                if not starts_clock and self.after_s > 0:
                    return 0.0
                self._first = self._clock()
            if not self.active():
                return 0.0
            if not self._announced:
                self._announced = True
                print(f"noodle worker: emulated slowdown ON: every stage step now takes {self.factor:g}x its compute "
                      f"time ({self.after_s:g} s after the first step; unix time {time.time():.3f})", flush=True)  # fmt: skip
        return (self.factor - 1.0) * max(0.0, compute_s)

    def after_step(self, compute_s: float, *, starts_clock: bool = True) -> None:
        """Sleep what :meth:`extra_s` says (call it right after the step, inside the compute lock)."""
        extra = self.extra_s(compute_s, starts_clock=starts_clock)
        if extra > 0:
            self._sleep(extra)

    def describe(self) -> str:
        return f"emulating a {self.factor:g}x slowdown {self.after_s:g} s after the first stage step (test/demo knob)"
