"""Joint placement of several models: CP-SAT proven optimal against a brute force; the heuristic within memory."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from noodle.errors import InfeasibleError, NoodleError, SpecError
from noodle.graph.costmodel import DefaultCostModel, evaluate
from noodle.joint import JointModel, JointProblem
from noodle.solvers.joint import build_joint_tables, solve_joint
from noodle.solvers.joint.model import fits, plan_as_segments
from noodle.types import GIB, Cluster, Link, Node, Problem, Unit, Workload
from tests.solvers.instances import all_plans, is_feasible, random_problem

pytest.importorskip("ortools")


def joint_instance(seed: int, *, tight: bool = True, weights: tuple[float, float] = (1.0, 2.0),
                   required: bool = False) -> JointProblem:
    """Two models (4 and 3 units; the second steps 2 sequences at once) on 3 shared nodes."""
    a = random_problem(seed, n_units=4, n_nodes=3, tight=tight)
    b = random_problem(seed + 1000, n_units=3, n_nodes=3, tight=tight)
    b = replace(b, cluster=a.cluster, workload=Workload(64, 32, batch_size=2))
    return JointProblem((JointModel("a", a, weights[0], required), JointModel("b", b, weights[1], required)))


def brute_joint(jp: JointProblem) -> float | None:
    """``min U`` over every pair of single-model plans whose stages fit each node together (see joint.model)."""
    cm = DefaultCostModel()
    options = []
    for m in jp.models:
        mine = []
        for plan in all_plans(m.problem):
            if is_feasible(m.problem, plan, cm):
                ev = evaluate(m.problem, plan, cm)
                coef = m.weight / m.problem.workload.batch_size
                mine.append([(s.node, coef * s.total_ms, s.memory_bytes) for s in ev.stages])
        options.append(mine)
    best = None
    for combo in itertools.product(*options):
        load: dict[str, float] = {}
        mem: dict[str, int] = {}
        for stages in combo:
            for node, ms, nbytes in stages:
                load[node] = load.get(node, 0.0) + ms
                mem[node] = mem.get(node, 0) + nbytes
        if any(mem[n] > jp.cluster.node(n).memory_bytes for n in mem):
            continue
        value = max(load.values())
        best = value if best is None or value < best else best
    return best


@pytest.mark.parametrize("seed", range(10))
def test_cpsat_is_optimal_against_brute_force_and_heuristic_is_feasible(seed):
    jp = joint_instance(seed, tight=seed % 3 != 0)
    want = brute_joint(jp)
    if want is None:
        with pytest.raises(InfeasibleError):
            solve_joint(jp, solver="cpsat", time_limit_s=10)
        return
    got = solve_joint(jp, solver="cpsat", time_limit_s=10)
    assert got.status == "optimal" and got.gap is not None and got.gap < 1e-6
    assert got.objective_ms == pytest.approx(want, rel=1e-6)
    assert got.tokens_per_s[1] / got.tokens_per_s[0] == pytest.approx(2.0)  # the weights' ratio
    jt = build_joint_tables(jp)
    assert fits(jt, plan_as_segments(jt, got.plan)) is None
    for m, plan in zip(jp.models, got.plan.plans):
        assert is_feasible(m.problem, plan)
    assert solve_joint(jp, solver="auto", time_limit_s=10).objective_ms == pytest.approx(want, rel=1e-6)


def test_heuristic_plans_fit_and_are_never_below_the_optimum():
    found = optimal = feasible = 0
    for seed in range(10):
        jp = joint_instance(seed, tight=seed % 3 != 0)
        want = brute_joint(jp)
        try:
            heur = solve_joint(jp, solver="heuristic", time_limit_s=2)
        except NoodleError:  # no plan found (where memory is tight), or none exists
            feasible += want is not None
            continue
        assert want is not None
        jt = build_joint_tables(jp)
        assert fits(jt, plan_as_segments(jt, heur.plan)) is None and heur.status == "heuristic"
        assert heur.objective_ms >= want * (1 - 1e-9)
        feasible += 1
        found += 1
        optimal += heur.objective_ms <= want * (1 + 1e-9)
    # measured on these seeds: 5 of the 6 feasible instances get a plan, 3 the optimum (coordinate descent
    # stops in local optima; one instance packs memory too tightly for a one-model-at-a-time start)
    assert (feasible, found, optimal) == (6, 5, 3)


def _one_unit_model(name: str, ms: float) -> Problem:
    node = Node("x", "cpu", 4.0, 1.0)
    units = (Unit(name, ms, int(0.5 * GIB), 1024),)
    return Problem(units, Cluster((node,), Link(1.0, 0.0)), Workload(8, 8, 1), name=name)


def _two_nodes(p: Problem, mem_gb: float = 4.0) -> Problem:
    nodes = (Node("fast", "gpu", mem_gb, 1.0), Node("slow", "cpu", mem_gb, 1.0))
    return replace(p, cluster=Cluster(nodes, Link(1.0, 0.0)))


@pytest.mark.parametrize("solver", ["cpsat", "heuristic"])
def test_sharing_a_node_adds_the_steps_and_weights_split_the_nodes(solver):
    a, b = _two_nodes(_one_unit_model("a", 4.0)), _two_nodes(_one_unit_model("b", 4.0))
    jp = JointProblem((JointModel("a", a, 3.0), JointModel("b", b, 1.0)))
    got = solve_joint(jp, solver=solver, time_limit_s=2)
    # one node each: U = max(3 * 4, 1 * 4) = 12 ms; sharing one node would cost 3 * 4 + 4 = 16 ms
    assert got.objective_ms == pytest.approx(12.0)
    assert {p.stages[0].node for p in got.plan.plans} == {"fast", "slow"}
    assert got.tokens_per_s[0] == pytest.approx(250.0)  # a alone on a node: one 4 ms step per token
    small = JointProblem(tuple(replace(m, problem=_two_nodes(m.problem, 0.6)) for m in jp.models))
    # each node holds one model: still apart. One node only (the other excluded): both share it.
    one = JointProblem(tuple(replace(m, problem=replace(m.problem, constraints=replace(
        m.problem.constraints, exclude=frozenset({"slow"})))) for m in jp.models))
    assert solve_joint(small, solver=solver, time_limit_s=2).objective_ms == pytest.approx(12.0)
    shared = solve_joint(one, solver=solver, time_limit_s=2)
    assert shared.objective_ms == pytest.approx(16.0)
    assert shared.tokens_per_s == pytest.approx((3000 / 16, 1000 / 16))


def test_required_rates_met_or_refused_with_the_numbers():
    a, b = _two_nodes(_one_unit_model("a", 4.0)), _two_nodes(_one_unit_model("b", 4.0))
    ok = JointProblem((JointModel("a", a, 200.0, True), JointModel("b", b, 100.0, True)))
    got = solve_joint(ok, time_limit_s=2)  # U = max(200 * 4, 100 * 4) = 800 ms of every 1000
    assert got.objective_ms == pytest.approx(800.0) and got.tokens_per_s == pytest.approx((250.0, 125.0))
    too_much = JointProblem((JointModel("a", a, 300.0, True), JointModel("b", b, 100.0, True)))
    with pytest.raises(InfeasibleError, match=r"a 250.0 of 300, b 83.3 of 100 tokens/s .*120%"):
        solve_joint(too_much, time_limit_s=2)


def test_joint_problem_refuses_mixed_shares_and_other_clusters():
    a, b = _two_nodes(_one_unit_model("a", 4.0)), _two_nodes(_one_unit_model("b", 4.0))
    with pytest.raises(SpecError, match="not a mix"):
        JointProblem((JointModel("a", a, 1.0), JointModel("b", b, 100.0, True)))
    with pytest.raises(SpecError, match="same cluster"):
        JointProblem((JointModel("a", a), JointModel("b", _one_unit_model("b", 4.0))))
    with pytest.raises(SpecError, match="duplicate model names a"):
        JointProblem((JointModel("a", a), JointModel("a", b)))
