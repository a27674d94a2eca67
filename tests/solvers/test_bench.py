"""The solver benchmark runs every solver, summarises and writes JSON/CSV/PNG (tiny instances)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.solverbench import run_benchmark, write_results
from bench.generate import problem_to_spec, random_instance
from noodle.cli.bench_solvers import RESULTS, SCRATCH, results_folder
from noodle.errors import SpecError
from noodle.spec import parse_spec
from tests.solvers.instances import llama_like_units


def test_benchmark_rows_summary_and_files(tmp_path):
    problems = [random_instance(s, units=llama_like_units(10), n_nodes=4, objective=o)
                for s in (0, 1) for o in ("throughput", "latency")]
    result = run_benchmark(problems=problems, time_limit_s=5, progress=False)
    rows = result["rows"]
    assert len(rows) == 4 * 8
    for r in rows:
        if r["objective_ms"] is not None:
            assert r["quality"] >= 1 - 1e-9
    auto = result["summary"]["solvers"]["auto"]
    assert auto["plans"] == 4 and auto["median_quality"] == 1.0
    assert "throughput/baseline-memory" in result["summary"]["best_vs_baselines"]
    paths = write_results(result, tmp_path)
    assert json.loads(paths["json"].read_text())["rows"][0]["solver"] == "auto"
    assert paths["csv"].read_text().splitlines()[0].startswith("instance,")
    assert paths["time_png"].stat().st_size > 1000 and paths["quality_png"].stat().st_size > 1000


def test_generated_instances_round_trip_through_a_spec():
    p = random_instance(3, units=llama_like_units(6), n_nodes=5, objective="latency")
    q = parse_spec(problem_to_spec(p)).to_problem()
    assert q.units == p.units and q.cluster.nodes == p.cluster.nodes and q.objective == p.objective
    for a in p.cluster.nodes:
        for b in p.cluster.nodes:
            if a.id != b.id:
                assert q.cluster.link(a.id, b.id) == p.cluster.link(a.id, b.id)


def test_bench_solvers_writes_outside_the_committed_results_unless_asked(tmp_path):
    assert results_folder(None, False) == SCRATCH and not str(SCRATCH).startswith("bench")
    assert results_folder(None, True) == RESULTS == Path("bench/results")
    assert results_folder(tmp_path, False) == tmp_path
    with pytest.raises(SpecError, match="--out .* and --commit-results: give one"):
        results_folder(tmp_path, True)
