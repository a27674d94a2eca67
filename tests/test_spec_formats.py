"""Spec ``formats`` and ``accuracy``: what the planner may choose, and the refusals, in one line each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from noodle import InfeasibleError, solve
from noodle.errors import SpecError
from noodle.plandoc import plan_document
from noodle.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "smollm2-quantized.yaml"
MODEL = ROOT / "out" / "models" / "smollm2"


def _spec(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(SPEC.read_text())
    data["model"]["profile"] = str(ROOT / "bench" / "results" / "quant-units.json")
    data["accuracy"]["measured"] = str(ROOT / "bench" / "results" / "quant.json")
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_example_is_infeasible_in_float32_and_feasible_with_formats(tmp_path):
    _, problem = load_spec(SPEC)
    doc = plan_document(problem, solve(problem))
    formats = {st.node: st.format for st in doc.stages}
    assert formats == {"mac-laptop": "bfloat16", "pi-box": "int8"}  # mps runs no int8; int4 is over the budget
    for st in doc.stages:
        assert st.memory_required_mb <= st.memory_available_mb
        assert "float32 would need" in st.rationale and "int4 over the accuracy budget" in st.rationale
    _, plain = load_spec(_spec(tmp_path, formats=None, accuracy=None))
    assert plain.formats is None
    with pytest.raises(InfeasibleError):
        solve(plain)


def test_the_budget_decides_which_formats_are_offered(tmp_path):
    loose = _spec(tmp_path, accuracy={"measured": str(ROOT / "bench/results/quant.json"), "min_token_agreement": 0.5})
    _, problem = load_spec(loose)
    assert [o.name for o in problem.formats.options] == ["float32", "bfloat16", "int8", "int4"]
    doc = plan_document(problem, solve(problem))
    assert doc.stages[-1].format == "int4"  # the fastest format on the pi box, once int4 is allowed
    strict = _spec(tmp_path, accuracy={"measured": str(ROOT / "bench/results/quant.json"), "min_token_agreement": 0.99})
    _, problem = load_spec(strict)  # only float32 is left, and it fits on no split
    assert [o.name for o in problem.formats.options] == ["float32"]
    with pytest.raises(InfeasibleError):
        solve(problem)
    data = yaml.safe_load(strict.read_text())
    data["cluster"]["nodes"][1]["formats"] = ["int8", "int4"]
    with pytest.raises(SpecError, match=r"cluster.nodes\[1\]: node 'pi-box' is left with no weight format \(int8: "
                                        r"token agreement 0.958 < 0.99"):
        parse_spec(data, "s.yaml").to_problem(tmp_path, source="s.yaml")


def test_a_node_listing_a_format_its_device_cannot_run_is_refused(tmp_path):
    data = yaml.safe_load(_spec(tmp_path).read_text())
    data["cluster"]["nodes"][0]["formats"] = ["bfloat16", "int8"]
    with pytest.raises(SpecError) as e:
        parse_spec(data, "s.yaml").to_problem(tmp_path, source="s.yaml")
    assert str(e.value) == ("s.yaml: cluster.nodes[0].formats[1]: format int8 cannot run on mps device 'mps': torch "
                            "has no int8 weight-only kernel for mps; use bfloat16 or float32 there")


def test_missing_figures_are_refused_with_what_to_run(tmp_path):
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"formats": {"int8": {"token_agreement": 0.99}}}))
    path = _spec(tmp_path, accuracy={"measured": str(acc), "min_token_agreement": 0.9})
    with pytest.raises(SpecError, match=r"no figures for format bfloat16 .*bench/quant.py"):
        load_spec(path)
    old = tmp_path / "units.json"
    doc = json.loads((ROOT / "bench/results/quant-units.json").read_text())
    doc.pop("formats")
    old.write_text(json.dumps(doc))
    data = yaml.safe_load(_spec(tmp_path, accuracy=None).read_text())
    data["model"]["profile"] = str(old)
    with pytest.raises(SpecError, match=r"has no bfloat16 figures .*noodle profile --formats float32,bfloat16"):
        parse_spec(data, "s.yaml").to_problem(tmp_path, source="s.yaml")
    data["formats"] = None
    assert parse_spec(data, "s.yaml").to_problem(tmp_path).formats is None  # old profiles still plan in float32


def test_inline_layers_carry_their_format_costs():
    layers = [{"name": n, "latency_ms": 2.0, "param_bytes": 400, "activation_bytes": 8,
               "formats": {"int8": {"latency_ms": 1.0, "param_bytes": 100}}} for n in ("embed", "block.0", "lm_head")]
    spec = {"model": {"layers": layers}, "formats": ["float32", "int8"],
            "cluster": {"nodes": [{"id": "a", "memory_gb": 300 / 2**30, "compute_score": 1.0}]}}
    problem = parse_spec(spec).to_problem()
    doc = plan_document(problem, solve(problem))
    assert [st.format for st in doc.stages] == ["int8"] and doc.objective_ms == pytest.approx(3.0)


@pytest.mark.slow
@pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="needs out/models/smollm2 (make demo)")
def test_the_example_plans_and_runs_end_to_end_through_the_cli(tmp_path):
    plan = tmp_path / "plan.json"
    run = [sys.executable, "-m", "noodle.cli.main"]
    subprocess.run([*run, "solve", str(SPEC), "--out", str(plan)], check=True, capture_output=True, cwd=ROOT)
    out = subprocess.run([*run, "exec", str(plan), "--model", str(MODEL), "--threads", "1", "--chat", "--format",
                          "json", "--prompt", "What is the capital of France?", "--max-new-tokens", "12"],
                         capture_output=True, text=True, cwd=ROOT, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    tokens = json.loads(out.stdout.strip().splitlines()[-1])["tokens"][0]
    from transformers import AutoTokenizer

    assert "Paris" in AutoTokenizer.from_pretrained(str(MODEL)).decode(tokens)
