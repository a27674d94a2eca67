"""The MILP of the segment model (:mod:`noodle.solvers.exact.segments`), built once as a sparse matrix.

``min c x`` s.t. ``row_lo <= A x <= row_hi``, ``col_lo <= x <= col_hi``, x = [u, h, r, T?] (``T`` the
bottleneck, throughput only; every other column binary). :class:`MilpModel` holds ``A`` column-wise (CSC);
HiGHS takes the arrays as they are, CBC reads the same model written as free MPS (:func:`write_mps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from noodle.solvers.exact.segments import SegmentModel
from noodle.solvers.tables import INF

__all__ = ["MilpModel", "milp_model", "model_arrays", "csc", "write_mps"]


@dataclass(frozen=True, eq=False)
class MilpModel:
    """One MILP, column-wise: ``A[:, j]`` holds ``value[start[j]:start[j+1]]`` at rows ``index[...]``."""

    start: np.ndarray  # int32, ncol + 1
    index: np.ndarray  # int32 row of each nonzero
    value: np.ndarray  # float
    row_lo: np.ndarray
    row_hi: np.ndarray
    obj: np.ndarray
    col_lo: np.ndarray
    col_hi: np.ndarray
    integer: np.ndarray  # bool per column
    sizes: tuple[int, int, int]  # segments, hops, returns: the first columns, in this order
    objective: str

    @property
    def ncol(self) -> int:
        return len(self.obj)

    def start_vector(self, start: dict[str, np.ndarray], upper: float) -> np.ndarray:
        """A column vector from :func:`~noodle.solvers.exact.segments.plan_in_model`'s start, ``T = upper``."""
        x0 = np.concatenate([start["u"], start["h"], start["r"]])
        return x0 if self.objective == "latency" else np.append(x0, upper)


def milp_model(model: SegmentModel) -> MilpModel:
    """The segment model as one :class:`MilpModel`."""
    a = model_arrays(model)
    start, index, value = csc(a["rows"], a["cols"], a["vals"], a["ncol"])
    return MilpModel(start, index, value, a["row_lo"], a["row_hi"], a["obj"], a["col_lo"], a["col_hi"],
                     a["integer"], a["sizes"], model.objective)


def model_arrays(model: SegmentModel) -> dict[str, Any]:
    """The model as ``min c x`` s.t. ``row_lo <= A x <= row_hi``, ``0 <= x <= col_hi`` (COO), x = [u, h, r, T?]."""
    n, m = model.n, model.m
    S, H, R = len(model.seg), len(model.hop), len(model.ret)
    J, Ss, E = model.seg.T if S else (np.zeros(0, int),) * 3
    HJ, HK, HP = model.hop.T if H else (np.zeros(0, int),) * 3
    RJ, RK = model.ret.T if R else (np.zeros(0, int),) * 2
    u0, h0, r0 = 0, S, S + H
    throughput = model.objective != "latency"
    ncol = S + H + R + (1 if throughput else 0)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    lo: list[float] = []
    hi: list[float] = []

    def add_rows(r: np.ndarray, c: np.ndarray, v: np.ndarray) -> None:
        rows.append(r)
        cols.append(c)
        vals.append(v)

    def new_rows(k: int, lower: float, upper: float) -> int:
        first = len(lo)
        lo.extend([lower] * k)
        hi.extend([upper] * k)
        return first

    one = lambda k: np.ones(k)  # noqa: E731
    ids = np.arange(S)
    b = new_rows(2, 1.0, 1.0)
    add_rows(np.full(int((Ss == 0).sum()), b), u0 + ids[Ss == 0], one(int((Ss == 0).sum())))
    add_rows(np.full(int((E == n).sum()), b + 1), u0 + ids[E == n], one(int((E == n).sum())))
    b = new_rows(m, -INF, 1.0)
    add_rows(b + J, u0 + ids, one(S))
    if model.max_stages < m or model.min_stages > 1:
        b = new_rows(1, float(model.min_stages) if model.min_stages > 1 else -INF,
                     float(model.max_stages) if model.max_stages < m else INF)
        add_rows(np.full(S, b), u0 + ids, one(S))
    # hop pairing at interior cuts: keys (j, p) for ends/outs and (k, p) for starts/ins
    key = lambda a, p: a * (n + 1) + p  # noqa: E731
    inner_e = (E > 0) & (E < n)
    inner_s = (Ss > 0) & (Ss < n)
    out_keys = np.unique(np.concatenate([key(J[inner_e], E[inner_e]), key(HJ, HP)]))
    in_keys = np.unique(np.concatenate([key(J[inner_s], Ss[inner_s]), key(HK, HP)]))
    b = new_rows(len(out_keys), 0.0, 0.0)
    add_rows(b + np.searchsorted(out_keys, key(HJ, HP)), h0 + np.arange(H), one(H))
    add_rows(b + np.searchsorted(out_keys, key(J[inner_e], E[inner_e])), u0 + ids[inner_e], -one(int(inner_e.sum())))
    b = new_rows(len(in_keys), 0.0, 0.0)
    add_rows(b + np.searchsorted(in_keys, key(HK, HP)), h0 + np.arange(H), one(H))
    add_rows(b + np.searchsorted(in_keys, key(J[inner_s], Ss[inner_s])), u0 + ids[inner_s], -one(int(inner_s.sum())))
    # returns
    b = new_rows(m, 0.0, 0.0)
    add_rows(b + RJ, r0 + np.arange(R), one(R))
    add_rows(b + J[E == n], u0 + ids[E == n], -one(int((E == n).sum())))
    b = new_rows(m, 0.0, 0.0)
    add_rows(b + RK, r0 + np.arange(R), one(R))
    add_rows(b + J[Ss == 0], u0 + ids[Ss == 0], -one(int((Ss == 0).sum())))
    cost = np.concatenate([model.seg_cost, model.hop_cost, model.ret_cost])
    col_hi = np.ones(ncol)
    obj = np.zeros(ncol)
    integer = np.ones(ncol, dtype=bool)
    if throughput:
        t = ncol - 1
        col_hi[t] = INF
        integer[t] = False
        obj[t] = 1.0
        b = new_rows(m, 0.0, INF)  # T - load_j >= 0
        add_rows(np.array([b + j for j in range(m)]), np.full(m, t), one(m))
        add_rows(b + J, u0 + ids, -model.seg_cost)
        add_rows(b + HJ, h0 + np.arange(H), -model.hop_cost)
        add_rows(b + RJ, r0 + np.arange(R), -model.ret_cost)
        if model.mix:  # mix * T - every cost >= 0
            b = new_rows(1, 0.0, INF)
            add_rows(np.array([b]), np.array([t]), np.array([float(model.mix)]))
            add_rows(np.full(S + H + R, b), np.arange(S + H + R), -cost)
    else:
        obj[: S + H + R] = cost
        if model.lower > 0:
            b = new_rows(1, model.lower, INF)
            add_rows(np.full(S + H + R, b), np.arange(S + H + R), cost)
    col_lo = np.zeros(ncol)
    if throughput:
        col_lo[-1] = model.lower
    return {
        "rows": np.concatenate(rows).astype(np.int64), "cols": np.concatenate(cols).astype(np.int64),
        "vals": np.concatenate(vals).astype(float), "row_lo": np.array(lo), "row_hi": np.array(hi),
        "obj": obj, "col_lo": col_lo, "col_hi": col_hi, "integer": integer, "ncol": ncol, "sizes": (S, H, R),
    }


def csc(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, ncol: int) -> tuple[np.ndarray, ...]:
    order = np.lexsort((rows, cols))
    rows, cols, vals = rows[order], cols[order], vals[order]
    return np.searchsorted(cols, np.arange(ncol + 1)).astype(np.int32), rows.astype(np.int32), vals


def _num(x: float) -> str:
    return repr(float(x))


def write_mps(mm: MilpModel, path: str | Path) -> None:
    """Write ``mm`` as free MPS (columns ``x<j>``, rows ``r<i>``; a row with two finite sides becomes two rows)."""
    lines = ["NAME noodle", "ROWS", " N obj"]
    rhs: list[str] = []
    names: list[list[str]] = []  # the row names of each matrix row (none for a free row)
    for i, (lo, hi) in enumerate(zip(mm.row_lo.tolist(), mm.row_hi.tolist())):
        rows = []
        if lo == hi:
            rows.append(("E", f"r{i}", lo))
        else:
            if np.isfinite(hi):
                rows.append(("L", f"r{i}", hi))
            if np.isfinite(lo):
                rows.append(("G", f"r{i}g" if np.isfinite(hi) else f"r{i}", lo))
        for kind, name, b in rows:
            lines.append(f" {kind} {name}")
            if b != 0:
                rhs.append(f" rhs {name} {_num(b)}")
        names.append([name for _, name, _ in rows])
    lines.append("COLUMNS")
    in_int = False
    for j in range(mm.ncol):
        if bool(mm.integer[j]) != in_int:
            in_int = not in_int
            lines.append(f" m{j} 'MARKER' '{'INTORG' if in_int else 'INTEND'}'")
        lines.append(f" x{j} obj {_num(mm.obj[j])}")
        for k in range(mm.start[j], mm.start[j + 1]):
            for name in names[mm.index[k]]:
                lines.append(f" x{j} {name} {_num(mm.value[k])}")
    if in_int:
        lines.append(f" m{mm.ncol} 'MARKER' 'INTEND'")
    lines += ["RHS", *rhs, "BOUNDS"]
    for j, (lo, hi) in enumerate(zip(mm.col_lo.tolist(), mm.col_hi.tolist())):
        if lo != 0:
            lines.append(f" {'LO' if np.isfinite(lo) else 'MI'} bnd x{j}" + (f" {_num(lo)}" if np.isfinite(lo) else ""))
        if np.isfinite(hi):
            lines.append(f" UP bnd x{j} {_num(hi)}")
        elif mm.integer[j]:
            lines.append(f" PL bnd x{j}")
    lines.append("ENDATA")
    Path(path).write_text("\n".join(lines) + "\n")
