"""Exact solvers: the segment model (:mod:`.segments`) solved as a MILP (:mod:`.milp`, HiGHS or CBC) or by
CP-SAT (:mod:`.cpsat`), the exact set DP (:mod:`.subsetdp`), and the time and size budgets they keep (:mod:`.limits`).
"""

__all__: list[str] = []
