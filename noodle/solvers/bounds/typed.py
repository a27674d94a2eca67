"""Lower bounds from a relaxation of the tables: the *typed knapsack*.

Every plan has exactly one stage that holds unit 0 (type *first*), one that holds
unit ``n-1`` (type *last*; they are the same stage only in a one-stage plan, handled
apart), and interior stages ``1 <= s < e <= n-1``. Forget where the stages sit and
in what order the nodes come, and keep: each node holds at most one stage, the
stage lengths sum to ``n``, and a stage costs at least

    f_j(t, l) = min over positions of type t and length l of  C_j[s, s+l] + out_j(s+l)

where ``out_j(e)`` is the cheapest hop from ``j`` at cut ``e`` to any other node (the
cheapest return for a last stage). Choosing a (type, length) or nothing per node is
a knapsack over nodes, solved exactly by a DP whose state is (first placed?, last
placed?, [stages used,] units covered): ``O(m n^2)``.

* groups and exits: charging every node its cheapest successor lets a relaxed plan hop
  only over fast links. Split the nodes into groups (components of the cheap links, for
  a few thresholds at the jumps of the sorted hop costs; *any* partition gives a valid
  bound): a plan spread over several groups leaves each of them, so every used group
  holds an *exit* node, priced with its cheapest hop out of the group. The DP carries
  (group used, exit placed) bits; the bound is the least of the single-group bounds and
  the multi-group bound, and the best partition tried is kept.
* latency: the DP minimises the sum of ``f``; its optimum bounds the latency from below.
  (A Lagrangian price on "each node is the successor of one other" was tried: it did not
  raise the bound on the benchmark instances and was dropped.)
* throughput: for a threshold ``tau`` the DP decides whether lengths with
  ``f_j <= tau`` can cover ``n`` units (a max-coverage DP when the allowed lengths are
  ``1..L``). A plan of bottleneck ``<= tau`` also forms a cycle (hops, then the return)
  in the graph whose arc ``j -> k`` exists when some stage of ``j`` can hand over to ``k``
  within ``tau``; so its nodes lie in one strongly connected component, and ``out_j``
  may be taken over successors in that component. The least feasible ``tau``
  (bisection) bounds the bottleneck from below; the incumbent's value is checked first.

The bound needs nothing from the cost model beyond the tables (additive or not). It
is often exact on real architectures, whose interior units are identical; when it
is, the heuristic's plan is proven optimal without any search.
"""

from __future__ import annotations

import time

import numpy as np

from noodle.solvers.bounds.knapsack import FIRST, INTERIOR, LAST, knap_min, max_cover, skew
from noodle.solvers.tables import INF, CostTables

__all__ = ["latency_bound", "throughput_bound", "throughput_feasible", "relaxed_picks", "objective_bound"]


def _out_min(tables: CostTables, succ: np.ndarray | None = None) -> np.ndarray:
    """``out[j, e]``: cheapest hop from j at cut e (return at e = n) over allowed successors."""
    m, n = len(tables.nodes), tables.n
    hop = tables.hop.copy()
    ret = tables.ret.copy()
    mask = ~np.eye(m, dtype=bool) if succ is None else (succ & ~np.eye(m, dtype=bool))
    hop[~mask] = INF
    ret[~mask] = INF
    out = hop.min(axis=1)
    out[:, n] = ret.min(axis=1)
    out[:, 0] = INF
    return out


def _typed(tables: CostTables, total: np.ndarray) -> np.ndarray:
    """``f[j, t, l]``: cheapest ``total[j, s, s+l]`` over positions of type t (FIRST, INTERIOR, LAST)."""
    n = tables.n
    s = np.arange(n + 1)[None, :]
    ln = np.arange(n + 1)[:, None]
    e = s + ln
    valid = (e <= n) & (ln >= 1)
    ec = np.minimum(e, n)
    by_len = total[:, np.broadcast_to(s, ec.shape), ec]  # (m, l, s)
    by_len = np.where(valid[None], by_len, INF)
    masks = ((s == 0) & (e < n), (s >= 1) & (e <= n - 1), (s >= 1) & (e == n))
    return np.stack([np.where(mk[None], by_len, INF).min(axis=2) for mk in masks], axis=1)


def _parts(tables: CostTables, succ: np.ndarray | None = None) -> list[list[list[int]]]:
    """Candidate partitions of the nodes into groups with cheap links inside (any partition gives a valid bound).

    Groups are the components of ``{j, k}: cheapest hop both ways <= theta`` for thresholds theta at the
    large jumps of the sorted hop costs (a rack, a home, an office).
    """
    m, n = len(tables.nodes), tables.n
    hop = tables.hop[:, :, 1:n].min(axis=2) if n > 1 else tables.ret.copy()
    both = np.maximum(hop, hop.T)
    off = both[~np.eye(m, dtype=bool)]
    if succ is not None:
        off = both[succ & ~np.eye(m, dtype=bool)]
    levels = np.unique(off[np.isfinite(off)])
    out = []
    for lo, hi in zip(levels[:-1], levels[1:]):
        if hi >= 2 * max(lo, 1e-9):
            adj = both <= lo
            seen = [-1] * m
            groups: list[list[int]] = []
            for v in range(m):
                if seen[v] >= 0:
                    continue
                comp, stack = [], [v]
                seen[v] = len(groups)
                while stack:
                    x = stack.pop()
                    comp.append(x)
                    for y in np.nonzero(adj[x])[0]:
                        if seen[y] < 0:
                            seen[y] = len(groups)
                            stack.append(int(y))
                groups.append(sorted(comp))
            if 1 < len(groups) < m:
                out.append(groups)
    return out[-3:]


def _single_stage(tables: CostTables) -> float:
    return float(tables.compute[:, 0, tables.n].min()) if tables.n else 0.0


def _succ_masks(m: int, group_of: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    same = (group_of[:, None] == group_of[None, :]) & allowed
    other = (group_of[:, None] != group_of[None, :]) & allowed
    return same, other


def latency_bound(tables: CostTables, *, upper: float = INF, time_limit_s: float = 1.0) -> float:
    """Typed-knapsack lower bound on the latency (best over a few node groupings)."""
    m, n = len(tables.nodes), tables.n
    single = _single_stage(tables)
    if m < 2 or n < 2:
        return single
    deadline = time.perf_counter() + time_limit_s
    allowed = ~np.eye(m, dtype=bool)
    out = _out_min(tables)
    f_all = _typed(tables, tables.compute + out[:, None, :])
    best = knap_min(f_all, None, [list(range(m))], n, tables.max_stages)
    for groups in _parts(tables):
        if time.perf_counter() > deadline or best >= upper * (1 - 1e-9):
            break
        group_of = np.empty(m, dtype=np.int64)
        for g, members in enumerate(groups):
            group_of[members] = g
        same, other = _succ_masks(m, group_of, allowed)
        f_in = _typed(tables, tables.compute + _out_min(tables, succ=same)[:, None, :])
        f_out = _typed(tables, tables.compute + _out_min(tables, succ=other)[:, None, :])
        multi = knap_min(f_in, f_out, groups, n, tables.max_stages)
        alone = min(knap_min(f_in, None, [g], n, tables.max_stages) for g in groups)
        best = max(best, min(multi, alone))
    return min(best, single)


def _sccs(adj: np.ndarray) -> list[list[int]]:
    """Strongly connected components of a boolean adjacency matrix (iterative Tarjan)."""
    m = len(adj)
    index = [-1] * m
    low = [0] * m
    on = [False] * m
    stack: list[int] = []
    out: list[list[int]] = []
    counter = 0
    nbrs = [np.nonzero(adj[v])[0].tolist() for v in range(m)]
    for root in range(m):
        if index[root] >= 0:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on[v] = True
            descended = False
            while i < len(nbrs[v]):
                w = nbrs[v][i]
                i += 1
                if index[w] < 0:
                    work.append((v, i))
                    work.append((w, 0))
                    descended = True
                    break
                if on[w]:
                    low[v] = min(low[v], index[w])
            if descended:
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on[w] = False
                    comp.append(w)
                    if w == v:
                        break
                out.append(comp)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return out


def _closed_lengths(f: np.ndarray, tau: float) -> np.ndarray | None:
    """Longest allowed length per (node, type) when allowed lengths are 1..L; None when they have holes."""
    ok = f <= tau
    longest = np.where(ok.any(axis=2), ok.shape[2] - 1 - np.argmax(ok[:, :, ::-1], axis=2), 0)
    ln = np.arange(ok.shape[2])[None, None, :]
    closed = ok == ((ln >= 1) & (ln <= longest[:, :, None]))
    return longest if closed.all() else None


def _cover_feasible(f_in: np.ndarray, f_out: np.ndarray | None, groups, n: int, cap: int, tau: float) -> bool:
    L_in = _closed_lengths(f_in, tau)
    L_out = _closed_lengths(f_out, tau) if f_out is not None else None
    if L_in is not None and (f_out is None or L_out is not None):
        return max_cover(L_in, L_out, groups, n, cap) >= n
    zero = lambda f: np.where(f <= tau, 0.0, INF)  # noqa: E731
    return knap_min(zero(f_in), zero(f_out) if f_out is not None else None, groups, n, cap) == 0.0


def throughput_feasible(tables: CostTables, tau: float, partitions: list[list[list[int]]] | None = None) -> bool:
    """False proves that no plan has a bottleneck ``<= tau`` (True proves nothing)."""
    m, n = len(tables.nodes), tables.n
    if _single_stage(tables) <= tau:
        return True
    if m < 2 or n < 2:
        return False
    comp = tables.compute
    min_end = comp.min(axis=1)  # (m, e): cheapest stage of j ending at e
    hop = tables.hop.copy()
    hop[:, :, 0] = INF
    hop[:, :, n] = INF
    arcs = ((min_end[:, None, :] + hop) <= tau).any(axis=2)
    arcs |= (min_end[:, n][:, None] + tables.ret) <= tau
    np.fill_diagonal(arcs, False)
    partitions = partitions if partitions is not None else _parts(tables)
    for scc in _sccs(arcs):
        if len(scc) < 2:
            continue
        members = sorted(scc)
        inside = np.zeros(m, dtype=bool)
        inside[members] = True
        allowed = arcs & inside[:, None] & inside[None, :]
        f_all = _typed(tables, comp + _out_min(tables, succ=allowed)[:, None, :])
        if not _cover_feasible(f_all, None, [members], n, tables.max_stages, tau):
            continue
        refuted = False
        for groups in partitions:
            group_of = np.full(m, -1, dtype=np.int64)
            for g, mem in enumerate(groups):
                group_of[mem] = g
            sub = [[j for j in g if inside[j]] for g in groups]
            sub = [g for g in sub if g]
            if len(sub) < 2:
                continue
            same, other = _succ_masks(m, group_of, allowed)
            f_in = _typed(tables, comp + _out_min(tables, succ=same)[:, None, :])
            f_out = _typed(tables, comp + _out_min(tables, succ=other)[:, None, :])
            if not (_cover_feasible(f_in, f_out, sub, n, tables.max_stages, tau)
                    or any(_cover_feasible(f_in, None, [g], n, tables.max_stages, tau) for g in sub)):
                refuted = True
                break
        if not refuted:
            return True
    return False


def throughput_bound(tables: CostTables, *, upper: float, rel_tol: float = 1e-9, time_limit_s: float = 1.0) -> float:
    """Greatest ``tau`` shown infeasible by :func:`throughput_feasible` (bisection below ``upper``).

    ``upper`` itself is checked first, to within 1e-9 (a proof that a plan of that value is optimal);
    the bisection then stops within ``rel_tol`` or at ``time_limit_s``.
    """
    if not np.isfinite(upper):
        return 0.0
    partitions = _parts(tables)
    hi = upper * (1 - 1e-9) - 1e-12
    if not throughput_feasible(tables, hi, partitions):
        return hi
    lo = 0.0
    deadline = time.perf_counter() + time_limit_s
    while hi - lo > rel_tol * max(upper, 1e-12) and time.perf_counter() < deadline:
        mid = (lo + hi) / 2
        if throughput_feasible(tables, mid, partitions):
            hi = mid
        else:
            lo = mid
    return lo


def relaxed_picks(tables: CostTables, objective: str, tau: float = INF) -> list[tuple[int, int, int]]:
    """An optimal solution of the plain typed knapsack as (node, type, length) picks, to seed heuristics.

    For throughput only stages within ``tau`` may be picked (the sum of stage totals is minimised among
    them); for latency the sum is the relaxed latency. Empty when the relaxation has no solution.
    """
    m, n = len(tables.nodes), tables.n
    if m < 2 or n < 2:
        return []
    f = _typed(tables, tables.compute + _out_min(tables)[:, None, :])
    if objective != "latency":
        f = np.where(f <= tau, f, INF)
    counting = tables.max_stages < min(m, n)
    kk = tables.max_stages + 1 if counting else 1
    dk = 1 if counting else 0
    F = np.full((2, 2, kk, n + 1), INF)  # a, b, k, u
    F[0, 0, 0, 0] = 0.0
    history = []
    moves = ((INTERIOR, 0, 0), (FIRST, 1, 0), (LAST, 0, 1))
    for j in range(m):
        G = F.copy()
        code = np.full(G.shape, -1, dtype=np.int64)
        for t, da, db in moves:
            if not np.isfinite(f[j, t]).any():
                continue
            src = F[: 2 - da, : 2 - db, : kk - dk]
            y = skew(src, f[j, t])  # (a, b, k, u, w)
            arg = np.argmin(y, axis=-2)
            val = np.take_along_axis(y, arg[..., None, :], axis=-2)[..., 0, :]
            dst = G[da:, db:, dk:]
            better = val < dst
            dst[better] = val[better]
            code[da:, db:, dk:][better] = (t * (n + 1) + arg)[better]
        history.append(code)
        F = G
    ks = F[1, 1, :, n]
    k = int(np.argmin(ks))
    if not np.isfinite(ks[k]):
        return []
    picks = []
    a, b, u = 1, 1, n
    for j in range(m - 1, -1, -1):
        c = int(history[j][a, b, k, u])
        if c < 0:
            continue
        t, prev_u = divmod(c, n + 1)
        picks.append((j, t, u - prev_u))
        a -= t == FIRST
        b -= t == LAST
        k -= dk
        u = prev_u
    return picks[::-1]


def objective_bound(tables: CostTables, objective: str, *, upper: float, time_limit_s: float = 1.0,
                    rel_tol: float = 1e-9) -> float:
    """The bound for ``objective`` on ``tables``; with ``tables.mix`` (throughput = ``max(bottleneck,
    latency / mix)``) the larger of the two bounds. ``tables.min_stages`` is relaxed (the bound stays valid)."""
    if objective == "latency":
        return latency_bound(tables, upper=upper, time_limit_s=time_limit_s)
    low = throughput_bound(tables, upper=upper, time_limit_s=time_limit_s, rel_tol=rel_tol)
    if tables.mix:
        low = max(low, latency_bound(tables, upper=upper * tables.mix, time_limit_s=time_limit_s) / tables.mix)
    return low
