"""The typed knapsack DPs behind the lower bounds of :mod:`noodle.solvers.bounds`.

Each node picks one (type, length) or nothing; the picks must cover ``n`` units with
one stage of type FIRST and one of type LAST, using at most ``cap`` nodes. The DP state
is (first placed?, last placed?, [nodes used,] group used?, exit placed?, units covered);
nodes are visited group by group (see the module docstring of ``bounds`` for why every
used group needs an *exit* node). :func:`knap_min` minimises the sum of the picks' costs
(min-plus convolutions over lengths); :func:`max_cover`, for allowed lengths closed
downwards (``1..L``), maximises the units covered. Pure functions of numpy arrays.
"""

from __future__ import annotations

import numpy as np

from noodle.solvers.tables import INF

__all__ = ["FIRST", "INTERIOR", "LAST", "skew", "conv", "knap_min", "max_cover"]

FIRST, INTERIOR, LAST = 0, 1, 2


def skew(F: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``y[..., u, w] = F[..., u] + c[w - u]`` (INF where w < u), for w <= n."""
    n = F.shape[-1] - 1
    y = np.full((*F.shape[:-1], n + 1, 2 * n + 2), INF)
    u = np.arange(n + 1)
    y[..., u[:, None], u[:, None] + u[None, :]] = F[..., :, None] + c[None, :]
    return y[..., : n + 1]


def conv(F: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Min-plus convolution on the last axis: ``out[..., w] = min_{u+l=w} F[..., u] + c[l]`` for ``w <= n``."""
    return skew(F, c).min(axis=-2)


def knap_min(f_int: np.ndarray, f_ext: np.ndarray | None, groups: list[list[int]], n: int, cap: int) -> float:
    """Min total of per-node (type, length) picks covering n units, one FIRST and one LAST, at most ``cap`` nodes.

    With ``f_ext`` (cost when the node's successor lies outside its group), every used group must
    contain an *exit* node (one priced by ``f_ext``): the cycle of a plan spread over several groups
    leaves each of them. Groups are processed one after another with (used, exit) bits.
    """
    m_used = sum(len(g) for g in groups)
    kk = cap + 1 if cap < min(m_used, n) else 1
    counting = kk > 1
    F = np.full((2, 2, kk, 2, 2, n + 1), INF)  # a, b, k, used, exit, u
    F[0, 0, 0, 0, 0, 0] = 0.0
    moves = ((INTERIOR, 0, 0), (FIRST, 1, 0), (LAST, 0, 1))
    options = [(False, f_int)] + ([(True, f_ext)] if f_ext is not None else [])
    for group in groups:
        for j in group:
            G = F.copy()
            for ext, f in options:
                for t, da, db in moves:
                    c = f[j, t]
                    if not np.isfinite(c).any():
                        continue
                    dk = 1 if counting else 0
                    src = F[: 2 - da, : 2 - db, : kk - dk]
                    if not np.isfinite(src).any():
                        continue
                    src = src.min(axis=3)  # any used bit -> used
                    val = conv(src, c)  # (a, b, k, exit, u)
                    dst = G[da:, db:, dk:, 1]
                    if ext:
                        dst[:, :, :, 1] = np.minimum(dst[:, :, :, 1], val.min(axis=3))
                    else:
                        np.minimum(dst, val, out=dst)
            F = G
        if f_ext is not None:
            done = np.minimum(F[:, :, :, 0, 0], F[:, :, :, 1, 1])
            F = np.full_like(F, INF)
            F[:, :, :, 0, 0] = done
        else:
            F[:, :, :, 0, 0] = F.min(axis=(3, 4))
            F[:, :, :, 1:, :] = INF
            F[:, :, :, 0, 1:] = INF
    return float(F[1, 1, :, 0, 0, n].min())


def max_cover(L_int: np.ndarray, L_ext: np.ndarray | None, groups: list[list[int]], n: int, cap: int) -> int:
    """Like :func:`knap_min` for lengths closed downwards: the most units the picks can cover."""
    m_used = sum(len(g) for g in groups)
    kk = min(cap, n) + 1
    NEG = -(10**9)
    F = np.full((2, 2, kk, 2, 2), NEG, dtype=np.int64)
    F[0, 0, 0, 0, 0] = 0
    del m_used
    moves = ((INTERIOR, 0, 0), (FIRST, 1, 0), (LAST, 0, 1))
    options = [(False, L_int)] + ([(True, L_ext)] if L_ext is not None else [])
    for group in groups:
        for j in group:
            G = F.copy()
            for ext, L in options:
                for t, da, db in moves:
                    ln = int(L[j, t])
                    if ln <= 0:
                        continue
                    src = F[: 2 - da, : 2 - db, : kk - 1].max(axis=3)  # (a, b, k, exit)
                    val = np.where(src > NEG, src + ln, NEG)
                    dst = G[da:, db:, 1:, 1]
                    if ext:
                        dst[:, :, :, 1] = np.maximum(dst[:, :, :, 1], val.max(axis=3))
                    else:
                        np.maximum(dst, val, out=dst)
            F = G
        if L_ext is not None:
            done = np.maximum(F[:, :, :, 0, 0], F[:, :, :, 1, 1])
        else:
            done = F.max(axis=(3, 4))
        F = np.full_like(F, NEG)
        F[:, :, :, 0, 0] = done
    return int(F[1, 1, :, 0, 0].max())
