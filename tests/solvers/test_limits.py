"""Solver honesty: warm starts are never lost, model size is budgeted, the heuristic proves infeasibility."""

from __future__ import annotations

import pytest
import yaml

from noodle import InfeasibleError, solve
from noodle.cli.main import main
from noodle.graph.costmodel import DefaultCostModel
from noodle.solvers import SOLVERS
from noodle.solvers.exact import limits
from noodle.solvers.exact.cpsat import CpSatSolver
from bench.generate import problem_to_spec
from noodle.solvers.search.heuristic import HeuristicSolver
from noodle.solvers.exact.milp import MilpSolver
from noodle.solvers.exact.subsetdp import solve_subset_dp
from noodle.solvers.tables import build_tables, check_feasible, plan_segments, segments_value
from tests.solvers.instances import brute_force, random_problem

CM = DefaultCostModel()
INFEASIBLE_SEED = 28  # 6 units x 3 nodes: passes the simple memory checks, but no contiguous split fits


@pytest.mark.parametrize("solver_cls", [CpSatSolver, MilpSolver])
@pytest.mark.parametrize("seed", [3, 7, 11, 19])
def test_exact_solver_never_returns_worse_than_its_warm_start(solver_cls, seed):
    """Warm-started from a mediocre plan (a baseline's), the exact solver returns one at least as good."""
    p = random_problem(seed, n_units=9, n_nodes=4, objective=("throughput", "latency")[seed % 2], tight=False)
    tables = build_tables(p, CM)
    start = SOLVERS.get("baseline-petals").solve(p, tables, time_limit_s=5).plan
    assert start is not None
    start_val = segments_value(tables, plan_segments(tables, start), p.objective)
    res = solver_cls().solve(p, tables, time_limit_s=10, hint=start)
    assert res.plan is not None
    assert segments_value(tables, plan_segments(tables, res.plan), p.objective) <= start_val * (1 + 1e-9)


@pytest.mark.parametrize("name", ["cpsat", "milp"])
def test_a_model_over_the_budget_is_not_built_and_the_warm_start_comes_back(name, monkeypatch):
    p = random_problem(5, n_units=12, n_nodes=5, objective="throughput", tight=False)
    monkeypatch.setattr(limits, "MAX_MODEL_VARS", 10)
    res = solve(p, solver=name, time_limit_s=5)
    warm = HeuristicSolver(prove=False).solve(p, build_tables(p, CM), time_limit_s=2.5)
    assert res.plan is not None and res.status in ("feasible", "heuristic", "optimal")
    assert res.objective_ms <= warm.objective_ms * (1 + 1e-9)
    assert "model too large" in res.note and "budget of 10 " in res.note


def test_too_large_names_the_numbers():
    p = random_problem(2, n_units=8, n_nodes=4, tight=False)
    from noodle.solvers.exact.segments import build_segment_model

    model = build_segment_model(build_tables(p, CM), "latency")
    k = limits.model_vars(model)
    assert limits.too_large(model, 10.0) is None
    assert f"building {k:,} variables" in limits.too_large(model, 1e-9, 1e-3)


def _infeasible():
    p = random_problem(INFEASIBLE_SEED, n_units=6, n_nodes=3, tight=True)
    tables = build_tables(p, CM)
    check_feasible(p, tables)  # the quick checks pass: only a search can tell
    assert brute_force(p) is None
    return p


def test_heuristic_proves_infeasibility():
    p = _infeasible()
    res = HeuristicSolver().solve(p, build_tables(p, CM), time_limit_s=5)
    assert res.status == "infeasible" and res.plan is None
    with pytest.raises(InfeasibleError, match="no contiguous split of the 6 units fits"):
        solve(p, solver="heuristic", time_limit_s=5)


def test_heuristic_on_an_infeasible_spec_exits_3(tmp_path, capsys):
    spec = tmp_path / "infeasible.yaml"
    spec.write_text(yaml.safe_dump(problem_to_spec(_infeasible(), solver="heuristic", time_limit_s=5)))
    assert main(["solve", str(spec)]) == 3
    assert "no contiguous split" in capsys.readouterr().err


@pytest.mark.parametrize("seed", range(10_000, 10_012))
def test_heuristic_is_exact_on_small_hard_instances(seed):
    """10-14 units, 5-6 nodes, binding memory, uneven links: the exact set DP runs inside the heuristic."""
    import random

    rng = random.Random(seed)
    p = random_problem(seed, n_units=rng.randint(10, 14), n_nodes=rng.randint(5, 6),
                       objective=("throughput", "latency")[seed % 2], tight=True)
    tables = build_tables(p, CM)
    opt, _ = solve_subset_dp(tables, p.objective)
    res = HeuristicSolver().solve(p, tables, time_limit_s=10)
    if opt == float("inf"):
        assert res.status == "infeasible"
        return
    assert res.status == "optimal"
    assert res.objective_ms == pytest.approx(opt, rel=1e-9)
