"""One MILP model: the matrix HiGHS takes in memory and the MPS file CBC reads are the same model."""

from __future__ import annotations

import time

import highspy
import numpy as np
import pytest

from noodle.graph.costmodel import DefaultCostModel
from noodle.solvers.exact.milp_model import MilpModel, milp_model, write_mps
from noodle.solvers.exact.mip_backends import solve_cbc, solve_highs
from noodle.solvers.exact.segments import build_segment_model
from noodle.solvers.tables import build_tables
from tests.solvers.instances import random_problem


def _read(path) -> highspy.Highs:
    h = highspy.Highs()
    h.silent()
    h.readModel(str(path))
    return h


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_mps_file_is_the_in_memory_model(tmp_path, objective):
    """HiGHS reading the MPS file sees the same columns, bounds, integrality and optimum as the arrays."""
    problem = random_problem(4, n_units=8, n_nodes=4, objective=objective)
    mm = milp_model(build_segment_model(build_tables(problem, DefaultCostModel()), objective))
    write_mps(mm, tmp_path / "m.mps")
    lp = _read(tmp_path / "m.mps").getLp()
    assert lp.num_col_ == mm.ncol
    np.testing.assert_array_equal(lp.col_cost_, mm.obj)
    np.testing.assert_array_equal(lp.col_lower_, mm.col_lo)
    np.testing.assert_array_equal(np.minimum(lp.col_upper_, 1e300), np.minimum(mm.col_hi, 1e300))
    assert [int(v == highspy.HighsVarType.kInteger) for v in lp.integrality_] == mm.integer.astype(int).tolist()
    in_memory = solve_highs(mm, 20.0, None, time.perf_counter() + 60, {})
    h = _read(tmp_path / "m.mps")
    h.run()
    assert in_memory.status == "optimal"
    assert h.getInfo().objective_function_value == pytest.approx(in_memory.value, rel=1e-9)
    cbc = solve_cbc(mm, 20.0, None, {})
    assert cbc.status == "optimal" and cbc.value == pytest.approx(in_memory.value, rel=1e-6)


def test_a_row_with_two_finite_sides_is_written_as_two(tmp_path):
    """``1 <= x0 + x1 <= 1.5`` with x integer in [0, 1] and cost (1, 2): x0 = 1 is the optimum, value 1."""
    mm = MilpModel(start=np.array([0, 1, 2], np.int32), index=np.array([0, 0], np.int32), value=np.array([1.0, 1.0]),
                   row_lo=np.array([1.0]), row_hi=np.array([1.5]), obj=np.array([1.0, 2.0]),
                   col_lo=np.zeros(2), col_hi=np.ones(2), integer=np.array([True, True]), sizes=(2, 0, 0),
                   objective="latency")
    write_mps(mm, tmp_path / "r.mps")
    h = _read(tmp_path / "r.mps")
    assert h.getLp().num_row_ == 2
    h.run()
    assert h.getInfo().objective_function_value == pytest.approx(1.0)
    assert solve_cbc(mm, 5.0, None, {}).value == pytest.approx(1.0)
