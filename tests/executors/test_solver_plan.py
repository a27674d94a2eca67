"""A plan made by the solver (not by hand) runs and matches the unsplit model."""

from __future__ import annotations

import pytest

from noodle import parse_spec, plan_document, solve
from noodle.executors.local import LocalExecutor

from .conformance import PROMPT_SETS, check_executor


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_solver_made_plan_matches_generate(tiny_models, family):
    model = tiny_models[family]
    # Nodes too small for the whole model force the solver to split it.
    tiny_node = 0.0006  # GiB, about 640 KB; each unit of these models is 130-200 KB
    spec = parse_spec({
        "name": f"{family}-tiny-split",
        "model": {"hf_config": str(model / "config.json")},
        "workload": {"prompt_tokens": 16, "max_new_tokens": 8, "batch_size": 4},
        "cluster": {"nodes": [
            {"id": "a", "memory_gb": tiny_node, "compute_score": 1.0},
            {"id": "b", "memory_gb": tiny_node, "compute_score": 2.0},
            {"id": "c", "memory_gb": tiny_node, "compute_score": 1.0},
        ]},
        "objective": "latency",
        "solver": {"name": "auto", "time_limit_s": 5},
    })  # fmt: skip
    problem = spec.to_problem(".")
    plan = plan_document(problem, solve(problem, solver="auto", time_limit_s=5))
    assert len(plan.stages) >= 2
    check_executor(LocalExecutor, model, plan, PROMPT_SETS["padded"])
