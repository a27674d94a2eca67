"""The segment model shared by the exact solvers (CP-SAT and MILP), with its reductions.

Indices: usable nodes ``j, k``; cut positions ``p = 0..n``; allowed segments
``(j, s, e)`` (memory and pins already applied, see :mod:`noodle.solvers.tables`).

Variables (all binary):

* ``u[j,s,e]`` node j holds units ``[s, e)``;
* ``h[j,k,p]`` the stage on j ends at cut p and the one on k starts there (j != k);
* ``r[j,k]``   the last stage is on j and the first on k (``r[j,j]``: a single stage).

Constraints, with ``end[j,p] = sum_s u[j,s,p]`` and ``start[k,p] = sum_e u[k,p,e]``:

* the chain starts and ends once: ``sum_j start[j,0] = 1``, ``sum_j end[j,n] = 1``;
* one stage per node: ``sum_{s,e} u[j,s,e] <= 1``; at most K stages: ``sum u <= K``; at least
  ``K0`` (``tables.min_stages``, a part of a batched problem): ``sum u >= K0``;
* hops pair the stage that ends at p with the one that starts there (this also makes
  the chain flow: ``sum_j end[j,p] = sum_k start[k,p]``):
  ``sum_k h[j,k,p] = end[j,p]`` and ``sum_j h[j,k,p] = start[k,p]``;
* the return pairs last and first: ``sum_k r[j,k] = end[j,n]``, ``sum_j r[j,k] = start[k,0]``.

Objectives: latency ``min sum C u + sum H h + sum R r``; throughput ``min T`` with, for
each node j (one stage at most, so its outgoing hop is unique),
``T >= sum_{s,e} C[j,s,e] u[j,s,e] + sum_{k,p} H[j,k,p] h[j,k,p] + sum_k R[j,k] r[j,k]``;
with ``mix = C > 0`` (a batched part with more stages than streams, :mod:`noodle.solvers.batched`)
also ``C * T >= sum C u + sum H h + sum R r`` (the objective ``max(bottleneck, latency / C)``).

Reductions, given an incumbent of value ``U`` (the heuristic's plan, passed as the
hint) and a lower bound ``L`` (:mod:`noodle.solvers.bounds`); none removes a plan
worth less than ``U``, and the incumbent itself survives, so the optimum is kept:

* throughput: drop a segment when ``C[j,s,e] + min_k H[j,k,e] > U`` (its stage alone
  would exceed the incumbent), a hop when the cheapest stage of j ending at p plus
  ``H[j,k,p]`` exceeds U, a return likewise; add ``T >= L``;
* latency: with ``P[s]`` the cheapest cover of ``[0, s)`` and ``Q[e]`` of ``[e, n)``
  (node reuse allowed: a relaxation, ``O(m n^2)``), drop a segment when
  ``P[s] + C[j,s,e] + Q[e] > U``; add ``objective >= L``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from noodle.solvers.tables import INF, CostTables

__all__ = ["SegmentModel", "build_segment_model", "THROUGHPUT_TERMS"]

THROUGHPUT_TERMS = "compute + hop + return per node"
_TOL = 1e-9


@dataclass(frozen=True)
class SegmentModel:
    """The reduced model as arrays: segments, hops and returns with their costs."""

    n: int
    m: int
    seg: np.ndarray  # (S, 3) j, s, e
    seg_cost: np.ndarray  # (S,)
    hop: np.ndarray  # (H, 3) j, k, p
    hop_cost: np.ndarray
    ret: np.ndarray  # (R, 2) j, k  (j == k: single stage)
    ret_cost: np.ndarray
    max_stages: int
    objective: str
    lower: float  # valid lower bound on the optimum (0 when unknown)
    min_stages: int = 1
    mix: int = 0  # throughput: T >= (every cost) / mix as well, when > 0

    def segments(self) -> list[tuple[int, int, int]]:
        return [tuple(int(x) for x in row) for row in self.seg]  # type: ignore[misc]


def _cover_costs(tables: CostTables) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest cover of [0, s) (hop into s paid) and of [e, n) (return paid), node reuse allowed."""
    m, n = len(tables.nodes), tables.n
    hop = tables.hop.copy()
    idx = np.arange(m)
    hop[idx, idx, :] = INF
    out_min = hop.min(axis=1)  # (m, p)
    ret = tables.ret.copy()
    ret[idx, idx] = INF
    ret_min = ret.min(axis=1)  # (m,)
    comp = tables.compute
    P = np.full(n + 1, INF)
    P[0] = 0.0
    for e in range(1, n):  # P[e]: cover [0, e) and hand over at e
        P[e] = float(np.min(P[:e][None, :] + comp[:, :e, e] + out_min[:, e][:, None]))
    Q = np.full(n + 1, INF)  # Q[s]: cover [s, n) from a stage starting at s, return included
    Q[n] = 0.0
    # last stage: C[j,s,n] + ret (or nothing for a single stage, covered by P[0] = 0 and s = 0)
    last = comp[:, :, n] + ret_min[:, None]  # (m, s)
    for s in range(n - 1, -1, -1):
        cand = float(np.min(last[:, s])) if s > 0 else float(np.min(comp[:, 0, n]))
        if s + 1 < n:
            mid = comp[:, s, s + 1 : n] + out_min[:, s + 1 : n] + Q[None, s + 1 : n]
            cand = min(cand, float(np.min(mid)))
        Q[s] = cand
    return P, Q


def build_segment_model(
    tables: CostTables, objective: str, *, upper: float = INF, lower: float = 0.0
) -> SegmentModel:
    """The segment model of ``tables``, reduced with the incumbent value ``upper`` (see the module doc)."""
    m, n = len(tables.nodes), tables.n
    comp = tables.compute
    allowed = np.isfinite(comp)
    slack = upper * (1 + _TOL) + _TOL if np.isfinite(upper) else INF
    idx = np.arange(m)
    hop = tables.hop.copy()
    hop[idx, idx, :] = INF
    out_min = hop.min(axis=1)  # (m, p): cheapest hop from j at cut p
    ret = tables.ret.copy()
    ret_off = ret.copy()
    ret_off[idx, idx] = INF
    out_min[:, n] = ret_off.min(axis=1) if m > 1 else 0.0
    if np.isfinite(slack):
        if objective == "latency":
            P, Q = _cover_costs(tables)
            lb = P[None, :, None] + comp + out_min[:, None, :] + Q[None, None, :]
            lb[:, 0, n] = comp[:, 0, n]
            allowed &= lb <= slack
        else:
            stage = comp + out_min[:, None, :]
            stage[:, 0, n] = comp[:, 0, n]  # a single stage returns nothing
            allowed &= stage <= slack
    J, S, E = np.nonzero(allowed)
    seg = np.stack([J, S, E], axis=1).astype(np.int64)
    seg_cost = comp[J, S, E]
    # hops (j, k, p): some segment of j ends at p and some segment of k starts at p
    ends = np.zeros((m, n + 1), dtype=bool)
    starts = np.zeros((m, n + 1), dtype=bool)
    ends[J, E] = True
    starts[J, S] = True
    min_end = np.where(allowed, comp, INF).min(axis=1)  # (m, p) cheapest kept stage of j ending at p
    ok = ends[:, None, :] & starts[None, :, :]
    ok[idx, idx, :] = False
    ok[:, :, 0] = False
    ok[:, :, n] = False
    if objective != "latency" and np.isfinite(slack):
        ok &= (min_end[:, None, :] + tables.hop) <= slack
    HJ, HK, HP = np.nonzero(ok)
    hops = np.stack([HJ, HK, HP], axis=1).astype(np.int64)
    hop_cost = tables.hop[HJ, HK, HP]
    rok = ends[:, n][:, None] & starts[:, 0][None, :]
    single = np.zeros(m, dtype=bool)
    single[J[(S == 0) & (E == n)]] = True
    rok[idx, idx] = single
    if objective != "latency" and np.isfinite(slack):
        rr = min_end[:, n][:, None] + ret
        rr[idx, idx] = 0.0
        rok &= rr <= slack
    RJ, RK = np.nonzero(rok)
    rets = np.stack([RJ, RK], axis=1).astype(np.int64)
    ret_cost = np.where(RJ == RK, 0.0, ret[RJ, RK])
    return SegmentModel(n, m, seg, seg_cost, hops, hop_cost, rets, ret_cost, tables.max_stages, objective,
                        max(0.0, float(lower)), tables.min_stages, tables.mix if objective != "latency" else 0)


def plan_in_model(model: SegmentModel, segments: list[tuple[int, int, int]]) -> dict[str, np.ndarray] | None:
    """0/1 vectors (u, h, r) of a plan given as segments, or None if the model lost one of its pieces."""
    n1 = model.n + 1
    ordered = sorted(segments, key=lambda t: t[1])
    want_seg = [(j * n1 + s) * n1 + e for j, s, e in ordered]
    want_hop = [(a[0] * model.m + b[0]) * n1 + a[2] for a, b in zip(ordered, ordered[1:])]
    want_ret = [ordered[-1][0] * model.m + ordered[0][0]]
    out = {}
    for name, rows, keys, want in (
        ("u", model.seg, lambda a: (a[:, 0] * n1 + a[:, 1]) * n1 + a[:, 2], want_seg),
        ("h", model.hop, lambda a: (a[:, 0] * model.m + a[:, 1]) * n1 + a[:, 2], want_hop),
        ("r", model.ret, lambda a: a[:, 0] * model.m + a[:, 1], want_ret),
    ):
        vec = np.zeros(len(rows))
        if want:
            have = keys(rows) if len(rows) else np.zeros(0, dtype=np.int64)
            hit = np.isin(have, np.array(want, dtype=np.int64))
            if int(hit.sum()) != len(set(want)):
                return None
            vec[hit] = 1
        out[name] = vec
    return out
