"""The segment model shared by the exact solvers (CP-SAT and MILP).

Indices: usable nodes ``j, k``; cut positions ``p = 0..n``; allowed segments
``(j, s, e)`` (memory and pins already applied, see :mod:`noodle.solvers.tables`).

Variables (all binary):

* ``u[j,s,e]`` node j holds units ``[s, e)``;
* ``h[j,k,p]`` the stage on j ends at cut p and the one on k starts there (j != k);
* ``r[j,k]``   the last stage is on j and the first on k (``r[j,j]``: a single stage).

Constraints, with ``end[j,p] = sum_s u[j,s,p]`` and ``start[k,p] = sum_e u[k,p,e]``:

* flow along the chain: ``sum_j start[j,0] = 1``, ``sum_j end[j,n] = 1`` and, for
  ``0 < p < n``, ``sum_j end[j,p] = sum_k start[k,p]``;
* one stage per node: ``sum_{s,e} u[j,s,e] <= 1``; at most K stages: ``sum u <= K``;
* hops pair the stage that ends at p with the one that starts there:
  ``sum_k h[j,k,p] = end[j,p]`` and ``sum_j h[j,k,p] = start[k,p]``;
* the return pairs last and first: ``sum_k r[j,k] = end[j,n]``, ``sum_j r[j,k] = start[k,0]``.

Objectives: latency ``min sum C u + sum H h + sum R r``; throughput ``min T`` with, for
each node j (one stage at most, so its outgoing hop is unique),
``T >= sum_{s,e} C[j,s,e] u[j,s,e] + sum_{k,p} H[j,k,p] h[j,k,p] + sum_k R[j,k] r[j,k]``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from noodle.solvers.tables import CostTables

__all__ = ["SegmentIndex", "index_segments", "THROUGHPUT_TERMS"]

THROUGHPUT_TERMS = "compute + hop + return per node"


@dataclass(frozen=True)
class SegmentIndex:
    """Allowed segments and the hop/return pairs they can form."""

    segs: list[tuple[int, int, int]]
    starts_at: dict[tuple[int, int], list[int]]  # (j, p) -> indices into segs
    ends_at: dict[tuple[int, int], list[int]]
    by_node: dict[int, list[int]]
    hops: list[tuple[int, int, int]]  # (j, k, p) that can both end/start at p


def index_segments(tables: CostTables) -> SegmentIndex:
    segs = tables.segments()
    starts_at: dict[tuple[int, int], list[int]] = defaultdict(list)
    ends_at: dict[tuple[int, int], list[int]] = defaultdict(list)
    by_node: dict[int, list[int]] = defaultdict(list)
    for i, (j, s, e) in enumerate(segs):
        starts_at[j, s].append(i)
        ends_at[j, e].append(i)
        by_node[j].append(i)
    m = len(tables.nodes)
    hops = [
        (j, k, p)
        for p in range(1, tables.n)
        for j in range(m)
        if (j, p) in ends_at
        for k in range(m)
        if k != j and (k, p) in starts_at
    ]
    return SegmentIndex(segs, dict(starts_at), dict(ends_at), dict(by_node), hops)
