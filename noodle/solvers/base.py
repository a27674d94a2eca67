"""The Solver protocol, its result type, option checking, and the solver registry.

A solver declares, as cvxpy's solver interface does: ``name``; ``exact`` (it proves optimality or
infeasibility when the time allows, so :func:`~noodle.solvers.solve` warm-starts it with the
heuristic's plan); ``requires`` (the optional modules it runs on, any one of them, checked by
``is_installed()`` without importing them); ``options`` (the solver-specific options it accepts, with their
types, passed through to its backend); and a ``STATUS_MAP`` from its backend's statuses to ours, in its module.

Statuses: ``optimal`` (proven), ``feasible`` (a plan with a bound and gap, not
proven), ``infeasible`` (proven: no plan exists), ``heuristic`` (a plan with no
proof), ``baseline`` (a plan from a reference strategy, for comparison), ``unknown``
(no plan and no proof within the time limit).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from noodle.errors import SolverUnavailable, SpecError
from noodle.registry import Registry
from noodle.solvers.tables import CostTables
from noodle.types import Plan, Problem

__all__ = ["STATUSES", "SolveResult", "Solver", "SolverBase", "SolverRegistry", "SOLVERS", "OptionSpec",
           "check_options", "plan_from_segments", "relative_gap", "installed"]

STATUSES = ("optimal", "feasible", "infeasible", "heuristic", "baseline", "unknown")

# An option's type (``float`` takes ints too; ``bool`` is not an int here) or the tuple of the values it may take.
OptionSpec = type | tuple[Any, ...]
_KINDS = {int: "an integer", bool: "true or false", str: "a string"}


@dataclass(frozen=True)
class SolveResult:
    """What a solver returns; ``objective_ms`` is the plan re-evaluated under the cost model."""

    solver: str
    status: str
    plan: Plan | None
    objective_ms: float | None
    bound_ms: float | None
    solve_time_s: float
    note: str = ""
    interrupted: bool = False  # Ctrl-C ended the search early; the plan is the best found so far

    @property
    def gap(self) -> float | None:
        if self.objective_ms is None or self.bound_ms is None:
            return None
        return relative_gap(self.objective_ms, self.bound_ms)


def relative_gap(objective: float, bound: float) -> float:
    """``(objective - bound) / objective``, clipped at 0."""
    if objective <= 0:
        return 0.0
    return max(0.0, (objective - bound) / objective)


class Solver(Protocol):
    """A placement solver. ``solve`` never mutates its inputs. Its attributes are read-only here, so class
    attributes (as :class:`SolverBase` declares them) and instance attributes both satisfy it."""

    @property
    def name(self) -> str: ...

    @property
    def exact(self) -> bool: ...

    @property
    def requires(self) -> tuple[str, ...]: ...

    @property
    def options(self) -> Mapping[str, OptionSpec]: ...

    def is_installed(self) -> bool:
        """Whether a module of ``requires`` can be imported (always, when it requires none)."""
        ...

    def solve(
        self, problem: Problem, tables: CostTables, *, time_limit_s: float, hint: Plan | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> SolveResult:
        """Solve ``problem`` whose costs are ``tables``; ``hint`` is a feasible plan to warm-start from;
        ``options`` were checked by :func:`check_options`."""
        ...


def installed(modules: tuple[str, ...]) -> bool:
    """True when ``modules`` is empty or one of them can be imported (checked without importing it)."""
    return not modules or any(importlib.util.find_spec(m) is not None for m in modules)


class SolverBase:
    """Defaults for the declared attributes: not exact, needs nothing, takes no options; ``optimises``
    (False for a fixed rule such as a baseline) lets :func:`~noodle.solvers.solve` run it once per part of a
    batched problem (:mod:`noodle.solvers.batched`)."""

    name: str = ""
    exact: ClassVar[bool] = False
    optimises: ClassVar[bool] = True
    requires: tuple[str, ...] = ()
    options: ClassVar[Mapping[str, OptionSpec]] = {}

    def is_installed(self) -> bool:
        return installed(self.requires)


def check_options(solver: Solver, options: Mapping[str, Any] | None, where: str = "options") -> dict[str, Any]:
    """``options`` checked against what ``solver`` declares; ``where`` names them in errors (e.g. the spec field).

    Raises:
        SpecError: an option the solver does not know (named, with the valid ones), or a value of the wrong type.
    """
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        spec = solver.options.get(key)
        if spec is None:
            valid = ", ".join(solver.options) if solver.options else f"solver {solver.name!r} takes no options"
            raise SpecError(f"{where}: unknown option {key!r} for solver {solver.name!r}; valid options: {valid}")
        if isinstance(spec, tuple):
            if value not in spec:
                raise SpecError(f"{where}.{key}: {value!r} is not a choice, give one of {', '.join(map(repr, spec))}")
        elif spec is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpecError(f"{where}.{key}: {value!r} is not a number, give a number")
            value = float(value)
        elif isinstance(value, bool) != (spec is bool) or not isinstance(value, spec):
            kind = _KINDS.get(spec, f"a {spec.__name__}")
            raise SpecError(f"{where}.{key}: {value!r} is not {kind}, give {kind}")
        out[key] = value
    return out


class SolverRegistry(Registry[Solver]):
    """The solver registry: checks each solver's declared attributes when it is registered, and that it is
    installed when it is built."""

    _DECLARED = ("name", "exact", "requires", "options", "is_installed", "solve")

    def register(self, name: str, factory: Callable[[], Solver]) -> None:
        impl = factory()
        missing = [a for a in self._DECLARED if not hasattr(impl, a)]
        if missing:
            raise TypeError(f"solver {name!r} does not declare {', '.join(missing)}")
        super().register(name, factory)

    def get(self, name: str) -> Solver:
        """Build the solver registered as ``name``.

        Raises:
            SolverUnavailable: an unknown name (the valid ones listed) or a solver whose modules are missing.
        """
        impl = super().get(name)
        if not impl.is_installed():
            raise SolverUnavailable(f"solver {name!r} needs {' or '.join(impl.requires)}: "
                                    f"pip install {impl.requires[0]}")
        return impl

    def installed(self) -> list[str]:
        """Names of the registered solvers that can run here, in preference order."""
        return [n for n in self.names() if Registry.get(self, n).is_installed()]


SOLVERS: SolverRegistry = SolverRegistry("solver")


def plan_from_segments(tables: CostTables, segments: list[tuple[int, int, int]]) -> Plan:
    """Plan from chosen (node index, start, end) segments, ordered along the chain."""
    ordered = sorted(segments, key=lambda t: t[1])
    return Plan.from_cuts([tables.nodes[j].id for j, _, _ in ordered], [0, *(e for _, _, e in ordered)])
