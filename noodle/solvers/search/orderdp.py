"""The exact dynamic programme for a fixed node order, alone and vectorised across many orders.

For an order ``o_1, o_2, ...`` of distinct nodes, the pipeline uses a prefix
``o_1..o_S`` and cut points ``0 = c_0 < ... < c_S = n``. With ``C_j[s, e]`` a stage's
compute, ``H_jk[p]`` a hop and ``R_jk`` the token's return (see
:mod:`noodle.solvers.tables`):

* latency:    ``F_i[p] = min_q F_{i-1}[q] + H_{o_{i-1} o_i}[q] + C_{o_i}[q, p]``,
  value ``min_i F_i[n] + R_{o_i o_1}``;
* throughput: ``G_i[p] = min_q max(G_{i-1}[q], C_{o_i}[q, p] + H_{o_i o_{i+1}}[p])`` for
  ``p < n``, and ``C_{o_i}[q, n] + R_{o_i o_1}`` in the last stage.

Each DP layer is one vectorised ``min`` over the rows ``q`` whose value is still below
the best plan found (partial values never decrease, so the others cannot lead to a
better plan), so an order costs at most ``O(S n^2)`` flops and usually far less.
:func:`dp_values` runs the same layers for a batch of orders at once (the local search
prices a whole neighbourhood in one call); :mod:`.heuristic` searches over the orders.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from noodle.solvers.tables import INF, CostTables, segments_value

__all__ = ["dp_order", "dp_values"]


def dp_order(
    tables: CostTables, order: list[int], objective: str, *, cutoff: float = INF
) -> tuple[float, list[tuple[int, int, int]]]:
    """Best plan whose stages use a prefix of ``order`` (node indices); (value, segments).

    Plans worth ``cutoff`` or more are not reported (``(INF, [])`` when none is better). With
    ``tables.mix`` (throughput = ``max(bottleneck, latency / mix)``) the better of the order's
    bottleneck-optimal and latency-optimal plans: a heuristic, not the order's optimum.
    """
    if objective == "latency" or not tables.mix:
        return _dp_order(tables, order, objective, cutoff=cutoff)
    best: tuple[float, list[tuple[int, int, int]]] = (INF, [])
    for obj in ("throughput", "latency"):
        _, seg = _dp_order(tables, order, obj)
        val = segments_value(tables, seg, "throughput") if seg else INF
        if val < min(best[0], cutoff):
            best = (val, seg)
    return best


def _dp_order(
    tables: CostTables, order: list[int], objective: str, *, cutoff: float = INF
) -> tuple[float, list[tuple[int, int, int]]]:
    """:func:`dp_order` for the plain objectives (``tables.mix`` ignored)."""
    n = tables.n
    first = order[0]
    latency = objective == "latency"
    limit = min(len(order), tables.max_stages)
    best_val, best_end = cutoff, -1
    rows_hist: list[np.ndarray] = []
    arg_hist: list[np.ndarray] = []
    prev = np.full(n + 1, INF)
    prev[0] = 0.0
    for i in range(limit):
        j = order[i]
        rows = np.flatnonzero(prev[:n] < best_val)
        if rows.size == 0:
            break
        c = tables.compute[j][rows]  # (rows, n+1)
        if latency:
            base = prev[rows] + (tables.hop[order[i - 1], j, rows] if i else 0.0)
            cand = base[:, None] + c
        else:
            if i + 1 < limit:
                out = tables.hop[j, order[i + 1]]
                stage = c + out[None, :]
            else:
                stage = c.copy()
                stage[:, :n] = INF  # no next node: this stage must be the last
            stage[:, n] = c[:, n] + (tables.ret[j, first] if i else 0.0)
            cand = np.maximum(prev[rows][:, None], stage)
        arg = np.argmin(cand, axis=0)
        vals = cand[arg, np.arange(n + 1)]
        rows_hist.append(rows)
        arg_hist.append(arg)
        total = vals[n] + (tables.ret[j, first] if (latency and i > 0) else 0.0)
        if i + 1 >= tables.min_stages and \
                total < best_val - (1e-12 * abs(best_val) if np.isfinite(best_val) else 0.0):
            best_val, best_end = float(total), i
        prev = vals
    if best_end < 0:
        return INF, []
    segments: list[tuple[int, int, int]] = []
    p = n
    for i in range(best_end, -1, -1):
        q = int(rows_hist[i][arg_hist[i][p]])
        segments.append((order[i], q, p))
        p = q
    return best_val, segments[::-1]


def dp_values(
    tables: CostTables, orders: np.ndarray, objective: str, *, cutoff: float = INF, chunk_elems: int = 4_000_000,
    deadline: float | None = None,
) -> np.ndarray:
    """Values of :func:`dp_order` for many orders at once (rows of ``orders``), vectorised across orders.

    Values at or above ``cutoff`` may be reported as INF (orders and rows that cannot beat it are dropped).
    Past ``deadline`` the remaining orders are INF and the current ones keep the best plan over the stage
    counts done so far (a valid plan's value, perhaps not the order's optimum). With ``tables.mix``:
    ``max(best bottleneck, best latency / mix)`` per order, a lower bound on its plans (to rank orders).
    """
    if objective != "latency" and tables.mix:
        low = dp_values(replace(tables, mix=0), orders, "throughput", cutoff=cutoff, chunk_elems=chunk_elems,
                        deadline=deadline)
        lat = dp_values(tables, orders, "latency", cutoff=cutoff * tables.mix, chunk_elems=chunk_elems,
                        deadline=deadline)
        return np.maximum(low, lat / tables.mix)
    orders = np.asarray(orders, dtype=np.int64)
    k_all, m = orders.shape
    n = tables.n
    per = max(1, chunk_elems // ((n + 1) * (n + 1)))
    if k_all > per:
        parts: list[np.ndarray] = []
        for i in range(0, k_all, per):
            if deadline is not None and parts and time.perf_counter() > deadline:
                parts.append(np.full(min(per, k_all - i), INF))
            else:
                parts.append(dp_values(tables, orders[i : i + per], objective, cutoff=cutoff, deadline=deadline))
        return np.concatenate(parts)
    latency = objective == "latency"
    limit = min(m, tables.max_stages)
    best = np.full(k_all, INF)
    live = np.arange(k_all)  # orders still able to beat the cutoff
    prev = np.full((k_all, n + 1), INF)
    prev[:, 0] = 0.0
    for i in range(limit):
        if deadline is not None and i and time.perf_counter() > deadline:
            break
        rows = np.flatnonzero((prev[:, :n] < cutoff).any(axis=0))
        if rows.size == 0:
            break
        sub = orders[live]
        j = sub[:, i]
        first = sub[:, 0]
        c = tables.compute[j[:, None], rows[None, :]]  # (K, q, p)
        p_rows = prev[:, rows]
        if latency:
            base = p_rows + (tables.hop[sub[:, i - 1], j][:, rows] if i else 0.0)
            cand = base[:, :, None] + c
        else:
            if i + 1 < limit:
                stage = c + tables.hop[j, sub[:, i + 1]][:, None, :]
            else:
                stage = np.full_like(c, INF)
            stage[:, :, n] = c[:, :, n] + (tables.ret[j, first][:, None] if i else 0.0)
            cand = np.maximum(p_rows[:, :, None], stage)
        vals = cand.min(axis=1)
        total = vals[:, n] + (tables.ret[j, first] if (latency and i > 0) else 0.0)
        if i + 1 >= tables.min_stages:
            best[live] = np.minimum(best[live], total)
        vals[:, n] = INF
        cutoff = min(cutoff, float(best.min()))
        keep = (vals < cutoff).any(axis=1)
        live, prev = live[keep], vals[keep]
        if live.size == 0:
            break
    return best
