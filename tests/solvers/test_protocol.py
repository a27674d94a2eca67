"""The Solver protocol's declared attributes, as the registry and ``solve()`` check them."""

from __future__ import annotations

import pytest
import yaml

from noodle import evaluate, solve
from noodle.cli.main import main
from noodle.errors import SolverUnavailable, SpecError
from noodle.solvers import SOLVERS, check_options
from noodle.solvers.base import SolverBase, SolverRegistry
from noodle.solvers.exact.milp import MilpSolver
from bench.generate import problem_to_spec
from tests.solvers.instances import brute_force, random_problem


@pytest.mark.parametrize("name", SOLVERS.names())
def test_every_solver_declares_the_protocol(name):
    impl = SOLVERS.get(name)
    assert impl.name.startswith(name.split("-")[0])
    assert isinstance(impl.exact, bool) and isinstance(impl.requires, tuple) and impl.is_installed()
    assert impl.exact == (name in ("cpsat", "milp"))


def test_registry_refuses_a_solver_missing_an_attribute_and_one_not_installed():
    class Bare:
        name = "bare"

        def solve(self, *a, **k):
            return None

    class Missing(SolverBase):
        name = "missing"
        requires = ("no_such_module_for_noodle",)

        def solve(self, *a, **k):
            return None

    reg = SolverRegistry("solver")
    with pytest.raises(TypeError, match="exact, requires, options, is_installed"):
        reg.register("bare", Bare)
    reg.register("missing", Missing)
    assert reg.installed() == []
    with pytest.raises(SolverUnavailable, match="needs no_such_module_for_noodle"):
        reg.get("missing")


def test_unknown_option_is_named_with_the_valid_ones():
    problem = random_problem(1, n_units=6, n_nodes=3)
    with pytest.raises(SpecError, match=r"options: unknown option 'gap' for solver 'milp'; valid options: backend"):
        solve(problem, solver="milp", options={"gap": 0.1})
    with pytest.raises(SpecError, match="takes no options"):
        solve(problem, solver="auto", options={"seed": 1})
    with pytest.raises(SpecError, match=r"options.threads: 1.5 is not an integer"):
        check_options(MilpSolver(), {"threads": 1.5})
    with pytest.raises(SpecError, match=r"options.backend: 'gurobi' is not a choice, give one of 'highs', 'cbc'"):
        check_options(MilpSolver(), {"backend": "gurobi"})
    with pytest.raises(SpecError, match="presolve: 1 is not true or false"):
        check_options(MilpSolver(), {"presolve": 1})
    assert check_options(MilpSolver(), {"mip_rel_gap": 0, "threads": 2}) == {"mip_rel_gap": 0.0, "threads": 2}


@pytest.mark.parametrize("backend", ["highs", "cbc"])
def test_options_reach_the_backend(backend):
    """``backend`` picks the MILP backend through solve(); both prove the brute-force optimum."""
    problem = random_problem(5, n_units=7, n_nodes=3, objective="throughput")
    res = solve(problem, solver="milp", time_limit_s=20, options={"backend": backend, "threads": 1})
    assert res.solver.startswith(f"milp/{backend}") or res.solver == "milp/heuristic"
    assert res.status == "optimal"
    assert evaluate(problem, res.plan).objective_ms == pytest.approx(brute_force(problem), rel=1e-6)


def test_spec_options_are_checked_at_the_edge(tmp_path, capsys):
    problem = random_problem(2, n_units=6, n_nodes=3)
    doc = problem_to_spec(problem, solver="heuristic", time_limit_s=2)
    doc["solver"]["options"] = {"seed": 3, "patience": 2}
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(doc))
    assert main(["solve", str(spec)]) == SpecError.exit_code
    err = capsys.readouterr().err
    assert f"{spec}: solver.options: unknown option 'patience' for solver 'heuristic'; valid options: seed" in err
    doc["solver"]["options"] = {"seed": 3}
    spec.write_text(yaml.safe_dump(doc))
    assert main(["solve", str(spec), "-f", "json"]) == 0
