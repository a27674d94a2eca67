"""The vectorised DefaultCostModel tables equal the generic per-call tables; additivity is detected."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from noodle.graph.costmodel import DefaultCostModel
from noodle.solvers.tables import _build_generic, build_tables
from noodle.types import Constraints, Pin
from tests.solvers.instances import random_problem

FIELDS = ("compute", "memory", "hop", "ret")


@pytest.mark.parametrize("seed", range(12))
def test_fast_path_is_identical_to_generic(seed):
    cons = [Constraints(), Constraints(pins=(Pin(1, 3, "n0"),)), Constraints(exclude=frozenset({"n1"}), max_stages=2)]
    p = random_problem(seed, n_units=7, n_nodes=4, constraints=cons[seed % 3], tight=seed % 2 == 0)
    fast, slow = build_tables(p, DefaultCostModel()), _build_generic(p, DefaultCostModel())
    for f in FIELDS:
        assert np.array_equal(getattr(fast, f), getattr(slow, f)), f  # bit for bit
    assert fast.nodes == slow.nodes and fast.max_stages == slow.max_stages and fast.n == slow.n
    assert fast.additive and slow.additive
    np.testing.assert_allclose(fast.compute_prefix, slow.compute_prefix, rtol=1e-12)
    assert np.array_equal(fast.memory_prefix, slow.memory_prefix)


class _Superlinear(DefaultCostModel):
    """A subclass takes the generic path; a non-additive compute is detected as such."""

    name = "superlinear"

    def stage_compute_ms(self, problem, node, start, end):
        return super().stage_compute_ms(problem, node, start, end) * (1 + 0.1 * (end - start))


def test_custom_models_use_generic_path_and_additivity_is_checked():
    p = random_problem(3, n_units=6, n_nodes=3)
    t = build_tables(p, _Superlinear())
    assert not t.additive
    fin = np.isfinite(t.compute)
    assert np.array_equal(fin, np.isfinite(build_tables(p, DefaultCostModel()).compute))


def test_flat_hops():
    p = random_problem(4, n_units=6, n_nodes=3)
    t = build_tables(p, DefaultCostModel())
    uniform = dataclasses.replace(p, units=tuple(dataclasses.replace(u, activation_bytes=4096) for u in p.units))
    assert build_tables(uniform, DefaultCostModel()).flat_hops() is not None
    if len({u.activation_bytes for u in p.units[:-1]}) > 1:
        assert t.flat_hops() is None
