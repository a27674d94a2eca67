"""Search: the exact DP for a fixed node order (:mod:`.orderdp`) and the iterated local search over orders (:mod:`.heuristic`),
seeded with the start orders of :mod:`.orders`.
"""

__all__: list[str] = []
