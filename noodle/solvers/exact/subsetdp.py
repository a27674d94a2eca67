"""Exact dynamic programme over the set of used nodes (Held-Karp style), with symmetry.

Nodes are first grouped into *classes* of interchangeable nodes: two nodes are
interchangeable when swapping them leaves every table unchanged (same compute and
memory rows, same hops and returns to every other node, and the same hop between
them in both directions). A class of ``c`` identical machines then contributes a
count ``0..c`` to the state instead of ``2^c`` subsets.

State ``(v, f, j, p)``: the used-node count vector ``v`` over classes, the class
``f`` of the first stage's node, the class ``j`` of the node whose stage starts
at unit ``p`` (that stage is still open; the hop into it is paid). Its value is
the best partial objective over plans in that state:

* latency: ``V[v+e_u, f, u, e] = min_{j,p} V[v, f, j, p] + C_j[p, e] + H_{ju}[e]``,
  computed as ``G[f, j, e] = min_p V[v, f, j, p] + C_j[p, e]`` then a min over ``j``,
  so a vector costs ``O(T^2 n^2 + T^3 n)``;
* throughput: ``V[v+e_u, f, u, e] = min_{j,p} max(V[v, f, j, p], C_j[p, e] + H_{ju}[e])``.

A plan closes when the open stage ends at ``n``: latency ``G[f, j, n] + R_{jf}``,
throughput ``max(V, C_j[p, n] + R_{jf})`` (``R`` is zero for a single stage). The
state space is ``prod_t (c_t + 1)`` vectors times ``T^2 (n+1)``; :func:`dp_work`
estimates the flops and :func:`solve_subset_dp` refuses instances over a budget.
The result is the exact optimum of the tables (no tolerance beyond floating point).
"""

from __future__ import annotations

import math
import time

import numpy as np

from noodle.solvers.tables import INF, CostTables

__all__ = ["node_classes", "dp_work", "dp_seconds", "solve_subset_dp", "Interrupted"]

SECONDS_PER_OP = 4e-9  # numpy element operations, measured on the 2-core development machine
SECONDS_PER_VECTOR = 2e-4  # Python overhead per count vector and next class


class Interrupted(Exception):
    """The deadline passed inside the DP (no incumbent: the DP completes or gives nothing)."""


def node_classes(tables: CostTables) -> list[list[int]]:
    """Groups of interchangeable nodes (exact equality of every table entry involved)."""
    m = len(tables.nodes)
    hop, ret, comp, mem = tables.hop, tables.ret, tables.compute, tables.memory
    classes: list[list[int]] = []

    def same(a: int, b: int) -> bool:
        if not (np.array_equal(comp[a], comp[b]) and np.array_equal(mem[a], mem[b])):
            return False
        others = [k for k in range(m) if k not in (a, b)]
        if not (np.array_equal(hop[a, others], hop[b, others]) and np.array_equal(hop[others, a], hop[others, b])):
            return False
        if not (np.array_equal(ret[a, others], ret[b, others]) and np.array_equal(ret[others, a], ret[others, b])):
            return False
        return bool(np.array_equal(hop[a, b], hop[b, a]) and ret[a, b] == ret[b, a])

    for j in range(m):
        for cls in classes:
            rep = cls[0]
            # j may join when it mirrors rep, and (for a class of 3+) the link inside the class is uniform
            inner_ok = len(cls) < 2 or (np.array_equal(hop[rep, cls[1]], hop[rep, j]) and ret[rep, cls[1]] == ret[rep, j])
            if inner_ok and same(rep, j):
                cls.append(j)
                break
        else:
            classes.append([j])
    return classes


def _vectors(caps: list[int], limit: int) -> tuple[np.ndarray, np.ndarray]:
    """All count vectors ``0 <= v <= caps`` with ``1 <= sum(v) <= limit``, by total, and their mixed-radix ids."""
    grids = np.stack(np.meshgrid(*[np.arange(c + 1) for c in caps], indexing="ij"), -1).reshape(-1, len(caps))
    tot = grids.sum(1)
    keep = (tot >= 1) & (tot <= limit)
    grids = grids[keep]
    grids = grids[np.argsort(grids.sum(1), kind="stable")]
    strides = np.cumprod([1, *[c + 1 for c in caps[:-1]]])
    return grids, grids @ strides


def dp_work(tables: CostTables, objective: str, classes: list[list[int]] | None = None) -> float:
    """Estimated element operations of :func:`solve_subset_dp` (used to decide whether to run it)."""
    classes = classes if classes is not None else node_classes(tables)
    caps = [len(c) for c in classes]
    t = len(caps)
    n2 = float(tables.n + 1) ** 2
    states = float(math.prod(c + 1 for c in caps))  # Python ints: no int64 overflow at 64 nodes
    if states > 5e6:
        return float("inf")
    # Average present classes ~ t/2; throughput pays one more factor for the next class.
    present = max(1.0, t / 2)
    per = present * present * n2 * (1 + (t - present if objective != "latency" else 0))
    return states * per


def dp_seconds(tables: CostTables, objective: str, classes: list[list[int]] | None = None) -> float:
    """Rough wall time of :func:`solve_subset_dp` (INF when the state space is out of reach)."""
    if objective != "latency" and tables.mix:  # max(bottleneck, latency / mix) is not this DP's
        return INF
    classes = classes if classes is not None else node_classes(tables)
    work = dp_work(tables, objective, classes)
    if not np.isfinite(work):
        return INF
    vectors = float(math.prod(len(c) + 1 for c in classes))
    return SECONDS_PER_OP * work + SECONDS_PER_VECTOR * vectors * len(classes)


def solve_subset_dp(
    tables: CostTables,
    objective: str,
    *,
    deadline: float | None = None,
    classes: list[list[int]] | None = None,
    cutoff: float = INF,
) -> tuple[float, list[tuple[int, int, int]]]:
    """Exact optimum of ``tables``: (value, segments as (node, start, end)); (INF, []) if infeasible.

    Plans of ``tables.min_stages`` to ``tables.max_stages`` stages; not for ``tables.mix`` (see :func:`dp_seconds`).

    With ``cutoff`` (an incumbent's value), only plans worth less are searched for: partial values at
    or above it are dropped (they never decrease), and (INF, []) then means "none better than cutoff".

    Raises:
        Interrupted: the deadline passed before the DP finished.
    """
    classes = classes if classes is not None else node_classes(tables)
    n = tables.n
    t = len(classes)
    caps = [len(c) for c in classes]
    reps = [c[0] for c in classes]
    C = tables.compute[reps]  # (t, n+1, n+1), INF where not allowed
    # Class-level hop/return: between distinct members (a same-class pair uses two members).
    H = np.full((t, t, n + 1), INF)
    R = np.full((t, t), INF)
    for a, ca in enumerate(classes):
        for b, cb in enumerate(classes):
            if a != b:
                H[a, b] = tables.hop[ca[0], cb[0]]
                R[a, b] = tables.ret[ca[0], cb[0]]
            elif len(ca) >= 2:
                H[a, a] = tables.hop[ca[0], ca[1]]
                R[a, a] = tables.ret[ca[0], ca[1]]
    H[:, :, 0] = INF
    H[:, :, n] = INF
    latency = objective == "latency"
    vecs, ids = _vectors(caps, tables.max_stages)
    pos = {int(i): k for k, i in enumerate(ids)}
    strides = np.cumprod([1, *[c + 1 for c in caps[:-1]]])
    nv = len(vecs)
    V = np.full((nv, t, t, n + 1), INF)
    # parent[v, f, u, e] = j * (n+1) + p of the previous open stage
    parent = np.full((nv, t, t, n + 1), -1, dtype=np.int64)
    for f in range(t):
        unit = np.zeros(t, dtype=np.int64)
        unit[f] = 1
        V[pos[int(unit @ strides)], f, f, 0] = 0.0
    best, best_state = INF, None
    for k in range(nv):
        if deadline is not None and (k & 15) == 0 and time.perf_counter() > deadline:
            raise Interrupted
        vec = vecs[k]
        present = np.nonzero(vec)[0]
        limit = min(best, cutoff)
        val = V[k][np.ix_(present, present)]  # (F, J, P)
        rows = np.flatnonzero((val < limit).any(axis=(0, 1)))
        if rows.size == 0:
            continue
        val = val[:, :, rows]
        Cj = C[present][:, rows]  # (J, P', E)
        # Close the open stage at n (a single stage, f == j alone, returns nothing).
        Rfj = R[np.ix_(present, present)].T  # (F, J): return from j to f
        if latency:
            full = val[:, :, :, None] + Cj[None]  # (F, J, P, E)
            Garg = np.argmin(full, axis=2)  # (F, J, E)
            G = np.take_along_axis(full, Garg[:, :, None, :], axis=2)[:, :, 0]
            fin = G[:, :, n] + (0.0 if vec.sum() == 1 else Rfj)
        else:
            last = Cj[None, :, :, n] + (0.0 if vec.sum() == 1 else Rfj[:, :, None])  # (F, J, P)
            fin = np.maximum(val, last).min(axis=2)
        fi, ji = np.unravel_index(np.argmin(fin), fin.shape)
        if vec.sum() >= tables.min_stages and fin[fi, ji] < best:
            best = float(fin[fi, ji])
            best_state = (k, int(present[fi]), int(present[ji]))
        if vec.sum() >= tables.max_stages:
            continue
        for u in range(t):
            if vec[u] >= caps[u]:
                continue
            nxt = pos[int(vec @ strides + strides[u])]
            Hu = H[present, u]  # (J, E)
            if latency:
                cand = G + Hu[None]  # (F, J, E)
                jj = np.argmin(cand, axis=1)  # (F, E)
                vals = np.take_along_axis(cand, jj[:, None, :], axis=1)[:, 0]
                pp = rows[np.take_along_axis(Garg, jj[:, None, :], axis=1)[:, 0]]
            else:
                stage = Cj + Hu[:, None, :]  # (J, P, E)
                flat = np.maximum(val[:, :, :, None], stage[None]).reshape(len(present), -1, n + 1)
                arg = np.argmin(flat, axis=1)  # (F, E)
                vals = np.take_along_axis(flat, arg[:, None, :], axis=1)[:, 0]
                jj, pp = np.divmod(arg, len(rows))
                pp = rows[pp]
            cur = V[nxt][present, u]
            better = (vals < cur) & (vals < limit)
            if better.any():
                V[nxt][present, u] = np.where(better, vals, cur)
                parent[nxt][present, u] = np.where(better, present[jj] * (n + 1) + pp, parent[nxt][present, u])
    if best_state is None or not best < cutoff:
        return INF, []
    return best, _trace(best_state, vecs, pos, strides, parent, V, C, H, R, classes, n, latency)


def _trace(state, vecs, pos, strides, parent, V, C, H, R, classes, n, latency) -> list[tuple[int, int, int]]:
    """Walk the parents back from the final state and give class members their stages."""
    k, f, j = state
    # which p did the last stage start at? recompute the argmin for the final close
    vec = vecs[k]
    val = V[k, f, j]
    if vec.sum() == 1:
        p = 0
    elif latency:
        p = int(np.argmin(val + C[j, :, n]))
    else:
        p = int(np.argmin(np.maximum(val, C[j, :, n] + R[j, f])))
    stages_cls: list[tuple[int, int, int]] = []
    end = n
    vid = int(vec @ strides)
    cur_j, cur_p = j, p
    while True:
        stages_cls.append((cur_j, cur_p, end))
        if cur_p == 0:
            break
        kk = pos[vid]
        code = int(parent[kk, f, cur_j, cur_p])
        prev_j, prev_p = divmod(code, n + 1)
        vid -= int(strides[cur_j])
        end = cur_p
        cur_j, cur_p = prev_j, prev_p
    stages_cls.reverse()
    used = {c: 0 for c in range(len(classes))}
    out = []
    for cls, s, e in stages_cls:
        out.append((classes[cls][used[cls]], s, e))
        used[cls] += 1
    return out
