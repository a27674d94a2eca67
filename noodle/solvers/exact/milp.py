"""MILP on the reduced segment model of :mod:`noodle.solvers.exact.segments`, one model for two backends.

The model is built once as a sparse matrix (:mod:`noodle.solvers.exact.milp_model`; no modelling
layer: building the 98-unit x 32-node model takes ~0.1 s) and handed to a backend
(:mod:`noodle.solvers.exact.mip_backends`). With highspy installed it goes to HiGHS in memory;
the status, the dual bound and the incumbent come from HiGHS, which is warm-started with the
heuristic's plan and handles Ctrl-C (it stops and keeps its incumbent: status ``kInterrupt``).
Without highspy (or with ``backend: cbc``), CBC (bundled with PuLP) solves the same model written
as MPS; CBC gives no bound, so a CBC stop on the time limit is ``feasible`` with the bound of
:mod:`noodle.solvers.bounds` only.

Options (the spec's ``solver.options``): ``backend`` (``highs`` | ``cbc``), ``mip_rel_gap``,
``threads``, ``presolve`` (defaults: HiGHS 1e-8, 1 thread, presolve off; CBC 0, its own threads and presolve).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from noodle.errors import SolverUnavailable
from noodle.solvers.base import SolveResult, SolverBase, installed, plan_from_segments
from noodle.solvers.bounds import objective_bound
from noodle.solvers.exact.limits import HIGHS_SECONDS_PER_VAR, bound_seconds, surely_too_large, too_large
from noodle.solvers.exact.milp_model import milp_model
from noodle.solvers.exact.mip_backends import (
    CBC_STATUS_MAP, HIGHS_STATUS_MAP, solve_cbc, solve_highs,
)
from noodle.solvers.exact.segments import build_segment_model, plan_in_model
from noodle.solvers.tables import INF, CostTables, plan_segments, segments_value
from noodle.types import Plan, Problem

__all__ = ["MilpSolver", "BACKENDS", "STATUS_MAP"]

BACKENDS = {"highs": "highspy", "cbc": "pulp"}  # backend -> the module it needs, in preference order
STATUS_MAP = {"highs": HIGHS_STATUS_MAP, "cbc": CBC_STATUS_MAP}


def _bound(tables: CostTables, objective: str, upper: float, seconds: float) -> float:
    return objective_bound(tables, objective, upper=upper, time_limit_s=seconds)


class MilpSolver(SolverBase):
    """Exact MILP; proves optimality with HiGHS (bound and gap) or CBC (optimal or not)."""

    name = "milp"
    exact = True
    requires = tuple(BACKENDS.values())
    options = {"backend": tuple(BACKENDS), "mip_rel_gap": float, "threads": int, "presolve": bool}

    def __init__(self, backend: str | None = None) -> None:
        self.backend = backend
        if backend is not None:
            self.requires = (BACKENDS[backend],)

    def _backend(self, chosen: str | None) -> str:
        """The backend option, else the constructor's, else the first installed one."""
        backend = chosen or self.backend
        if backend:
            if not installed((BACKENDS[backend],)):
                raise SolverUnavailable(f"solver 'milp' with backend {backend!r} needs {BACKENDS[backend]}: "
                                        f"pip install {BACKENDS[backend]}")
            return backend
        for backend, module in BACKENDS.items():
            if installed((module,)):
                return backend
        raise SolverUnavailable("solver 'milp' needs HiGHS or PuLP: pip install highspy (or pulp)")

    def solve(
        self, problem: Problem, tables: CostTables, *, time_limit_s: float, hint: Plan | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> SolveResult:
        opts = dict(options or {})
        backend = self._backend(opts.pop("backend", None))
        t0 = time.perf_counter()
        deadline = t0 + time_limit_s
        obj = problem.objective
        hint_seg = plan_segments(tables, hint) if hint is not None else None
        upper = segments_value(tables, hint_seg, obj) if hint_seg else INF
        lower = 0.0
        name = f"{self.name}/{backend}"
        early = surely_too_large(tables)
        if early is not None:
            elapsed = time.perf_counter() - t0
            if hint_seg:
                return SolveResult(name, "feasible", hint, upper, None, elapsed, f"{early}: the start plan, not searched further")
            return SolveResult(name, "unknown", None, None, None, elapsed, early)
        model = build_segment_model(tables, obj, upper=upper)  # size first: the bound is not free at 128 nodes
        why = too_large(model, deadline - time.perf_counter(), HIGHS_SECONDS_PER_VAR if backend == "highs" else 2e-5)
        if why is None and hint_seg:
            lower = _bound(tables, obj, upper, bound_seconds(time_limit_s))
            model = replace(model, lower=max(0.0, float(lower)))
        if why is not None:
            elapsed = time.perf_counter() - t0
            if hint_seg:
                return SolveResult(name, "feasible", hint, upper, min(lower, upper), elapsed,
                                   f"{why}: the start plan, not searched further")
            return SolveResult(name, "unknown", None, None, None, elapsed, why)
        start = plan_in_model(model, hint_seg) if hint_seg else None
        remaining = 0.95 * (deadline - time.perf_counter()) - 0.02
        if remaining < 0.05 and hint_seg:  # set-up spent the time: the start plan, no search
            return SolveResult(name, "feasible", hint, upper, min(lower, upper), time.perf_counter() - t0,
                               "the time limit was spent building the model: the start plan, not searched further")
        remaining = max(0.05, remaining)
        mm = milp_model(model)
        x0 = mm.start_vector(start, upper) if start is not None else None
        if backend == "highs":
            status, x, value, bound, interrupted = solve_highs(mm, remaining, x0, deadline, opts)
        else:
            status, x, value, bound, interrupted = solve_cbc(mm, remaining, x0, opts)
        elapsed = time.perf_counter() - t0
        if status == "infeasible":
            if hint_seg:  # the reductions keep the hint, so this cannot happen; report the hint
                return SolveResult(name, "optimal", hint, upper, upper, elapsed, "the start plan is optimal")
            return SolveResult(name, "infeasible", None, None, None, elapsed)
        if x is None or value is None:  # the backends give a value with every incumbent
            if hint_seg:
                return SolveResult(name, "feasible", hint, upper, max(lower, bound or 0.0), elapsed,
                                   f"{backend} found nothing better than the start plan", interrupted=interrupted)
            return SolveResult(name, status, None, None, None, elapsed, f"{backend} found no plan in {time_limit_s:g} s",
                               interrupted=interrupted)
        S = len(model.seg)
        chosen = [(int(j), int(s), int(e)) for j, s, e in (model.seg[i] for i in np.flatnonzero(x[:S] > 0.5))]
        plan = plan_from_segments(tables, chosen)
        bound = value if status == "optimal" else max(lower, bound if bound is not None else -INF)
        note = "interrupted (Ctrl-C): best plan so far" if interrupted else ""
        return SolveResult(name, status, plan, value, min(bound, value), elapsed, note, interrupted=interrupted)
