"""Every registered solver against independently brute-forced optima."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noodle import InfeasibleError, NoodleError, evaluate, solve
from noodle.solvers import SOLVERS
from noodle.types import Constraints, Pin
from tests.solvers.instances import brute_force, is_feasible, random_problem

EXACT = ["cpsat", "milp", "auto"]
CASES = [(seed, obj) for seed in range(8) for obj in ("throughput", "latency")]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b)) + 1e-5


@pytest.fixture(scope="module")
def optima() -> dict:
    out = {}
    for seed, obj in CASES:
        p = random_problem(seed, n_units=6, n_nodes=4 if seed % 2 else 3, objective=obj)
        out[seed, obj] = (p, brute_force(p))
    return out


def test_registry_order_and_names():
    assert SOLVERS.names()[:4] == ["auto", "cpsat", "milp", "heuristic"]


@pytest.mark.parametrize("solver", EXACT)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_exact_solvers_reach_brute_force_optimum(solver, case, optima):
    problem, best = optima[case]
    if best is None:
        with pytest.raises(InfeasibleError):
            solve(problem, solver=solver, time_limit_s=20)
        return
    res = solve(problem, solver=solver, time_limit_s=20)
    assert res.status == "optimal", res
    assert _close(res.objective_ms, best), (res.objective_ms, best)
    assert is_feasible(problem, res.plan)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_heuristic_within_ten_percent(case, optima):
    problem, best = optima[case]
    if best is None:
        with pytest.raises(NoodleError):
            solve(problem, solver="heuristic")
        return
    res = solve(problem, solver="heuristic", time_limit_s=5)
    assert is_feasible(problem, res.plan)
    assert res.objective_ms <= best * 1.10 + 1e-9


def test_milp_cbc_backend_is_exact():
    from noodle.solvers.exact.milp import MilpSolver
    from noodle.solvers.tables import build_tables
    from noodle.graph import DefaultCostModel

    problem = random_problem(3, n_units=6, n_nodes=3, objective="latency")
    best = brute_force(problem)
    tables = build_tables(problem, DefaultCostModel())
    res = MilpSolver(backend="cbc").solve(problem, tables, time_limit_s=20)
    assert res.status == "optimal"
    assert _close(evaluate(problem, res.plan).objective_ms, best)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    n_units=st.integers(2, 7),
    n_nodes=st.integers(1, 4),
    objective=st.sampled_from(["throughput", "latency"]),
    solver=st.sampled_from(["auto", "cpsat", "milp", "heuristic"]),
)
def test_plans_are_feasible_and_reevaluate_to_their_objective(seed, n_units, n_nodes, objective, solver):
    problem = random_problem(seed, n_units=n_units, n_nodes=n_nodes, objective=objective, tight=seed % 3 != 0)
    try:
        res = solve(problem, solver=solver, time_limit_s=10)
    except InfeasibleError:
        assert brute_force(problem) is None
        return
    except NoodleError as exc:  # the heuristic proves nothing: it may only say it found no plan
        assert solver == "heuristic" and "found no plan" in str(exc)
        assert brute_force(problem) is None
        return
    assert is_feasible(problem, res.plan)
    assert res.objective_ms == pytest.approx(evaluate(problem, res.plan).objective_ms, rel=1e-12)
    if res.status == "optimal":
        assert _close(res.objective_ms, brute_force(problem))


@pytest.mark.parametrize("solver", ["cpsat", "milp", "heuristic", "auto"])
def test_pins_exclusion_and_stage_cap_are_honoured(solver):
    base = random_problem(11, n_units=6, n_nodes=4, tight=False)
    cons = Constraints(pins=(Pin(0, 2, "n3"),), exclude=frozenset({"n1"}), max_stages=2)
    problem = dataclasses.replace(base, constraints=cons)
    res = solve(problem, solver=solver, time_limit_s=10)
    assert is_feasible(problem, res.plan)
    assert res.plan.stages[0].node == "n3" and res.plan.stages[0].end >= 2
    assert "n1" not in res.plan.nodes and len(res.plan.stages) <= 2
    best = brute_force(problem)
    if solver != "heuristic":
        assert _close(res.objective_ms, best)


@pytest.mark.parametrize("solver", ["cpsat", "milp", "heuristic", "auto"])
def test_infeasible_memory_names_the_numbers(solver):
    base = random_problem(5, n_units=5, n_nodes=3)
    tiny = tuple(dataclasses.replace(n, memory_gb=0.01) for n in base.cluster.nodes)
    problem = dataclasses.replace(base, cluster=dataclasses.replace(base.cluster, nodes=tiny))
    with pytest.raises(InfeasibleError, match=r"fits on no node; the largest, n\d, has 0.01 GiB"):
        solve(problem, solver=solver)


def test_infeasible_total_memory_message():
    from noodle.types import GIB, Cluster, Link, Node, Problem, Unit

    units = tuple(Unit(f"u{i}", 1.0, int(0.4 * GIB), 1) for i in range(4))
    nodes = tuple(Node(f"n{j}", "cpu", 0.5, 1.0) for j in range(3))
    problem = Problem(units, Cluster(nodes, Link(1.0, 0.1)))
    with pytest.raises(InfeasibleError, match=r"the model needs 1.60 GiB .*; all usable nodes together offer 1.50 GiB"):
        solve(problem)


def test_infeasible_pin_message():
    base = random_problem(7, n_units=6, n_nodes=3)
    cons = Constraints(pins=(Pin(0, 6, "n0"),))
    with pytest.raises(InfeasibleError, match=r"pin u0\.\.u5 on n0 needs .* GiB, the node has"):
        solve(dataclasses.replace(base, constraints=cons))


def test_contiguity_infeasibility_is_proven():
    # Memory suffices in total but no contiguous packing exists.
    from noodle.types import GIB, Cluster, Link, Node, Problem, Unit

    units = tuple(Unit(f"u{i}", 1.0, int(b * GIB), 1) for i, b in enumerate([0.6, 0.6, 0.6]))
    nodes = (Node("a", "gpu", 1.0, 1.0), Node("b", "gpu", 1.0, 1.0), Node("c", "cpu", 0.2, 1.0))
    problem = Problem(units, Cluster(nodes, Link(1.0, 0.1)))
    with pytest.raises(InfeasibleError, match="cannot be packed"):
        solve(problem, solver="cpsat")
