"""Seed orders for the heuristic's search over node orders.

The search (:mod:`noodle.solvers.search.heuristic`) starts from a few node orders: by speed,
by memory, and with sites (groups of nodes joined by cheap links) kept together, with
pinned nodes placed where their pins fall; :func:`picks_order` turns the picks of the
relaxation (:func:`noodle.solvers.bounds.relaxed_picks`) into one more such order.
These are pure functions of the cost tables.
"""

from __future__ import annotations

import numpy as np

from noodle.solvers.tables import CostTables

__all__ = ["start_orders", "picks_order"]


def _groups(tables: CostTables) -> list[list[int]]:
    """Nodes grouped by cheap links: components of pairs whose hop both ways is at most twice the cheapest."""
    m, n = len(tables.nodes), tables.n
    if m < 2:
        return [list(range(m))]
    hop = tables.hop[:, :, 1:n].min(axis=2) if n > 1 else tables.ret
    both = np.maximum(hop, hop.T)
    off = both[~np.eye(m, dtype=bool)]
    levels = np.unique(off)
    cut = levels[0]
    for lo, hi in zip(levels[:-1], levels[1:]):
        if hi >= 2 * max(lo, 1e-9):
            cut = lo
            break
    else:
        return [list(range(m))]
    seen = [False] * m
    out = []
    for v in range(m):
        if seen[v]:
            continue
        comp, stack = [], [v]
        seen[v] = True
        while stack:
            x = stack.pop()
            comp.append(x)
            for y in np.nonzero(both[x] <= cut)[0]:
                if not seen[y]:
                    seen[y] = True
                    stack.append(int(y))
        out.append(comp)
    return out


def start_orders(tables: CostTables, pinned: list[int], *, many: bool = False) -> list[list[int]]:
    """Seed orders: by speed, by memory, sites (cheap-link groups) kept together.

    Pinned nodes (``pinned``, in the order of their pins along the chain) are placed at the
    front and also spread along the order where their pins fall. With ``many``, also every node
    (and, up to 10 nodes, every pair) in front of the speed order: they are cheap to evaluate
    together (:func:`~noodle.solvers.search.orderdp.dp_values`) and let the search start near plans that lead with a slow node
    holding much memory, or with a particular pair.
    """
    nodes = tables.nodes
    speed = lambda j: (-nodes[j].compute_score, -nodes[j].memory_gb)  # noqa: E731
    rest = [j for j in range(len(nodes)) if j not in pinned]
    by_speed = sorted(rest, key=speed)
    bases = [by_speed, sorted(rest, key=lambda j: (-nodes[j].memory_gb, -nodes[j].compute_score))]
    groups = _groups(tables)
    if 1 < len(groups) < len(nodes):
        power = lambda g: -sum(nodes[j].compute_score for j in g)  # noqa: E731
        bases.append([j for g in sorted(groups, key=power) for j in sorted(g, key=speed) if j not in pinned])
    if many:
        for a in by_speed:
            bases.append([a] + [j for j in by_speed if j != a])
        if len(by_speed) <= 10:
            for a in by_speed:
                for b in by_speed:
                    if a != b:
                        bases.append([a, b] + [j for j in by_speed if j not in (a, b)])
    orders = []
    for base in bases:
        orders.append(pinned + base)
        if pinned:
            spread = base.copy()
            for i, j in enumerate(pinned):
                spread.insert(min(len(spread), round(i * len(base) / len(pinned))), j)
            orders.append(spread)
            orders.append(base[:1] + pinned + base[1:])
            orders.append(base + pinned)
    unique: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for o in orders:
        if tuple(o) not in seen:
            seen.add(tuple(o))
            unique.append(o)
    return unique


def picks_order(tables: CostTables, picks: list[tuple[int, int, int]]) -> list[int]:
    """An order realising relaxation picks (node, type, length): the first-type node first, the
    interior ones site by site (the first's site first, the last's site last), the last-type node
    last, then the unused nodes by speed."""
    groups = _groups(tables)
    gid = {j: g for g, members in enumerate(groups) for j in members}
    first = [j for j, t, _ in picks if t == 0]
    last = [j for j, t, _ in picks if t == 2]
    inner = [j for j, t, _ in picks if t == 1]
    fg = gid[first[0]] if first else -1
    lg = gid[last[0]] if last else -1
    inner.sort(key=lambda j: (0 if gid[j] == fg else 2 if gid[j] == lg else 1, gid[j], -tables.nodes[j].compute_score))
    order = first + inner + last
    rest = sorted((j for j in range(len(tables.nodes)) if j not in order), key=lambda j: -tables.nodes[j].compute_score)
    return order + rest
