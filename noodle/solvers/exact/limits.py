"""Budgets the exact model solvers keep: wall time (set-up included) and model size (memory).

Measured on the 2-core development machine (``bench/solver_limits.py``): a segment model
costs about 1.2 KiB of resident memory per variable in CP-SAT or HiGHS (Python-side
indices included), CP-SAT's Python model building about 6 us per variable and HiGHS about 15 us (its root LP, which
polls for interrupts too rarely to be stopped on time: 292k variables took 4 s). A model
over ``MAX_MODEL_VARS`` variables is not built: the solver returns its start plan (the
heuristic's) with the typed-knapsack bound and says why. Without this, 258 units x 128
nodes took 5-6 GB and overran a 5 s limit several times over.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from noodle.solvers.exact.segments import SegmentModel
from noodle.solvers.tables import CostTables

__all__ = ["MAX_MODEL_VARS", "BYTES_PER_VAR", "CPSAT_SECONDS_PER_VAR", "HIGHS_SECONDS_PER_VAR", "model_vars", "too_large", "surely_too_large", "hard_stop",
           "bound_seconds", "bound_cost_seconds"]

MAX_MODEL_VARS = 800_000  # ~1 GiB resident at BYTES_PER_VAR
BYTES_PER_VAR = 1300
CPSAT_SECONDS_PER_VAR = 6e-6
HIGHS_SECONDS_PER_VAR = 1.5e-5  # arrays + root LP, which HiGHS does not interrupt promptly


def model_vars(model: SegmentModel) -> int:
    """Binary variables of the segment model (segments + hops + returns)."""
    return len(model.seg) + len(model.hop) + len(model.ret)


def surely_too_large(tables: CostTables) -> str | None:
    """Why even a reduced model would be over budget, judged before building it (its hops alone), else None.

    The incumbent's reductions kept 55-65 % of the ``m (m-1) (n-1)`` possible hops on the measured
    instances (130 x 64, 258 x 128), so a model whose possible hops exceed twice the budget is not built.
    """
    m, n = len(tables.nodes), tables.n
    hops = m * (m - 1) * max(0, n - 1)
    if hops > 2 * MAX_MODEL_VARS:
        return (f"model too large: {hops:,} possible hops for {n} units x {m} nodes, over twice the budget of "
                f"{MAX_MODEL_VARS:,} variables (~{MAX_MODEL_VARS * BYTES_PER_VAR / 2**30:.1f} GiB)")
    return None


def too_large(model: SegmentModel, seconds_left: float, seconds_per_var: float = 0.0) -> str | None:
    """Why the model should not be built (memory budget, or building alone would spend the time left); else None."""
    k = model_vars(model)
    if k > MAX_MODEL_VARS:
        return (f"model too large: {k:,} variables (~{k * BYTES_PER_VAR / 2**30:.1f} GiB) over the budget of "
                f"{MAX_MODEL_VARS:,} (~{MAX_MODEL_VARS * BYTES_PER_VAR / 2**30:.1f} GiB)")
    build = k * seconds_per_var
    if build > 0.5 * seconds_left:
        return f"model too large for the time left: building {k:,} variables takes ~{build:.1f} s of {seconds_left:.1f} s"
    return None


def bound_cost_seconds(tables: CostTables) -> float:
    """Rough wall time of one pass of the typed-knapsack bound: ~2e-7 s per m (n+1)^2 (1.6 s at 258 x 128)."""
    return 2e-7 * len(tables.nodes) * (tables.n + 1) ** 2


def bound_seconds(time_limit_s: float) -> float:
    """Time the typed-knapsack bound may take inside an exact solver's limit."""
    return max(0.02, min(0.5, 0.1 * time_limit_s))


@contextmanager
def hard_stop(deadline: float, stop: Callable[[], None]) -> Iterator[threading.Event]:
    """Call ``stop`` (from a timer thread) at ``deadline`` if the block is still running; the event says it fired."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        stop()

    timer = threading.Timer(max(0.0, deadline - time.perf_counter()), fire)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()
