"""Lower bounds: the typed knapsack (:mod:`.typed`) over the DPs of :mod:`.knapsack`."""

from noodle.solvers.bounds.typed import (
    latency_bound, objective_bound, relaxed_picks, throughput_bound, throughput_feasible,
)

__all__ = ["latency_bound", "throughput_bound", "throughput_feasible", "relaxed_picks", "objective_bound"]
