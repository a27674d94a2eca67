"""Joint placement by coordinate descent over models (no proof), for instances past CP-SAT's reach.

The objective ``U`` is :mod:`noodle.solvers.joint.model`'s. One model is placed at a time *given the others*:
node ``j`` already carries ``offset_j`` ms per round and ``free_j`` bytes, and the model's best pipeline
minimises ``max over its stages of offset_j + a_m * t_m(k)`` with its stages within ``free_j``. For a fixed
node order ``v_1..v_S`` that is a DP over cuts (``O(S n^2)``)::

    D_0[0] = offset-free start;  D_i[e] = min_{s < e} max(D_{i-1}[s], offset_{v_i} + a_m * (compute[v_i, s, e] + out_i(e)))

with ``out_i(e)`` the hop to ``v_{i+1}`` at cut ``e`` (the return to ``v_1`` for the last stage). Orders: every
ordered subset of the nodes when there are at most ``EXHAUSTIVE_NODES``, else prefixes of orders by speed and
by memory plus seeded random orders. Start: models placed one after the other, heaviest first (several model
orders are tried, and starts where each model keeps within its share of every node's memory, its memory
need over all models' needs, so that the first ones leave room for the rest); then each model in turn is taken out and placed again given the others, kept when the
nodes' loads sorted from the largest fall lexicographically, until no model moves or the time is up.
"""

from __future__ import annotations

import itertools
import random
import time

import numpy as np

from noodle.solvers.joint.model import JointTables, Segments, fits, node_loads
from noodle.solvers.tables import INF, CostTables

__all__ = ["solve_heuristic", "place_one", "EXHAUSTIVE_NODES"]

EXHAUSTIVE_NODES = 5
RANDOM_ORDERS = 48
SHARE_FACTORS = (None, 1.0, 1.25)  # starts: no cap; each model within (factor x its memory share) of each node


def _orders(t: CostTables, offset: np.ndarray, rng: random.Random) -> list[tuple[int, ...]]:
    m = len(t.nodes)
    k = min(t.max_stages, m, t.n)
    if m <= EXHAUSTIVE_NODES:
        return [p for s in range(1, k + 1) for p in itertools.permutations(range(m), s)]
    single = t.compute[:, np.arange(t.n), np.arange(t.n) + 1]
    whole = np.where(np.isfinite(single), single, 0.0).sum(axis=1) / np.maximum(np.isfinite(single).mean(axis=1), 1e-9)
    speed = tuple(sorted(range(m), key=lambda j: (offset[j] + whole[j], j)))
    memory = tuple(sorted(range(m), key=lambda j: (-t.nodes[j].memory_bytes, j)))
    out = {speed[:k], memory[:k]}
    for _ in range(RANDOM_ORDERS):
        p = list(range(m))
        rng.shuffle(p)
        out.add(tuple(p[:k]))
    return sorted(out)


def _best_for_order(t: CostTables, a: float, offset: np.ndarray, free: np.ndarray,
                    order: tuple[int, ...]) -> tuple[float, Segments] | None:
    """Best pipeline on a prefix of ``order`` (every length), its value and segments."""
    n = t.n
    best: tuple[float, Segments] | None = None
    dp = np.full(n + 1, INF)
    dp[0] = 0.0
    back: list[np.ndarray] = []
    for i, j in enumerate(order):
        ok = np.isfinite(t.compute[j]) & (t.memory[j] <= free[j])
        base = np.where(ok, t.compute[j], INF)
        # this node as the last stage: return to the first node
        ret = float(t.ret[j, order[0]]) if i > 0 else 0.0
        last = np.maximum(dp[:, None], offset[j] + a * (base + ret))
        s = int(np.argmin(last[:, n]))
        if np.isfinite(last[s, n]) and (best is None or last[s, n] < best[0]):
            segs = [(j, s, n)]
            e = s
            for k in range(i - 1, -1, -1):
                prev = int(back[k][e])
                segs.append((order[k], prev, e))
                e = prev
            best = (float(last[s, n]), segs[::-1])
        if i + 1 < len(order):
            hop = t.hop[j, order[i + 1]]  # hop[p]: handing unit p-1's output on at cut p
            cost = np.maximum(dp[:, None], offset[j] + a * (base + hop[None, :]))
            cost[:, n] = INF  # a middle stage does not end the chain
            back.append(np.argmin(cost, axis=0))
            dp = cost.min(axis=0)
    return best


def place_one(t: CostTables, a: float, offset: np.ndarray, free: np.ndarray,
              orders: list[tuple[int, ...]]) -> Segments | None:
    """The model's best pipeline given the other models' loads ``offset`` and memory left ``free``."""
    best: tuple[float, Segments] | None = None
    for order in orders:
        got = _best_for_order(t, a, offset, free, order)
        if got is not None and (best is None or got[0] < best[0] - 1e-12):
            best = got
    return None if best is None else best[1]


def _key(jt: JointTables, plans: list[Segments]) -> tuple[float, ...]:
    return tuple(sorted(node_loads(jt, plans).tolist(), reverse=True))


def _rest(jt: JointTables, plans: list[Segments | None], skip: int) -> tuple[np.ndarray, np.ndarray]:
    others = [p if i != skip and p is not None else [] for i, p in enumerate(plans)]
    used = np.zeros(jt.num_nodes, dtype=np.int64)
    for t, segs in zip(jt.tables, others):
        for j, s, e in segs:
            used[j] += int(t.memory[j, s, e])
    return node_loads(jt, others), np.array(jt.capacity, dtype=np.int64) - used


def solve_heuristic(jt: JointTables, *, time_limit_s: float, seed: int = 0,
                    hint: list[Segments] | None = None) -> list[Segments] | None:
    """The best joint plan found, or None when no start placed every model."""
    deadline = time.perf_counter() + time_limit_s
    rng = random.Random(seed)
    k = len(jt.tables)
    weight = [a * float(np.min(np.where(np.isfinite(t.compute[:, 0, t.n]), t.compute[:, 0, t.n], INF)))
              if np.isfinite(t.compute[:, 0, t.n]).any() else a for t, a in zip(jt.tables, jt.coef)]
    heavy = sorted(range(k), key=lambda i: -weight[i])
    starts = [heavy, heavy[::-1], *(rng.sample(range(k), k) for _ in range(2))]
    need = [float(np.min(t.memory[:, 0, t.n])) for t in jt.tables]
    share = [x / sum(need) if sum(need) > 0 else 1.0 for x in need]
    cap = np.array(jt.capacity, dtype=np.float64)
    best: list[Segments] | None = hint if hint is not None and fits(jt, hint) is None else None
    for first, (factor, seq) in enumerate(itertools.product(SHARE_FACTORS, starts)):
        if first and time.perf_counter() > deadline:
            break
        plans: list[Segments | None] = [None] * k
        for i in seq:
            offset, free = _rest(jt, plans, i)
            if factor is not None:  # a start that leaves each other model its share of every node's memory
                free = np.minimum(free, (factor * share[i] * cap).astype(np.int64))
            plans[i] = place_one(jt.tables[i], jt.coef[i], offset, free, _orders(jt.tables[i], offset, rng))
            if plans[i] is None:
                break
        if any(p is None for p in plans):
            continue
        got = _descend(jt, [p for p in plans if p is not None], rng, deadline)
        if best is None or _key(jt, got) < _key(jt, best):
            best = got
    if best is not None and best is not hint:
        best = _descend(jt, best, rng, deadline)
    return best


def _descend(jt: JointTables, plans: list[Segments], rng: random.Random, deadline: float) -> list[Segments]:
    """Re-place one model at a time given the others while the sorted loads fall."""
    key = _key(jt, plans)
    moved = True
    while moved and time.perf_counter() < deadline:
        moved = False
        for i in range(len(plans)):
            offset, free = _rest(jt, list(plans), i)
            again = place_one(jt.tables[i], jt.coef[i], offset, free, _orders(jt.tables[i], offset, rng))
            if again is None:
                continue
            trial = [*plans[:i], again, *plans[i + 1:]]
            tkey = _key(jt, trial)
            if tkey < key:
                plans, key, moved = trial, tkey, True
    return plans
