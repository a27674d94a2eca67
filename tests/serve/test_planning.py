"""The embedded plan: this machine alone, measured (memory from psutil, speed from torch timings)."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from noodle.errors import SpecError
from noodle.graph.analytic import ReferenceDevice
from noodle.plandoc import PlanDoc
from noodle.serve.planning import embedded_spec, measure_reference, resolve_plan


def test_measured_reference_is_positive_and_finite() -> None:
    ref = measure_reference(seconds=0.05)
    assert 1e-4 <= ref.tflops < 1e4 and 1e-3 <= ref.mem_bandwidth_gbps < 1e5


def test_embedded_spec_uses_the_measurements(model_dir: Path) -> None:
    from noodle.executors.slicing import read_config

    ref = ReferenceDevice(tflops=0.25, mem_bandwidth_gbps=12.0)
    spec = embedded_spec(model_dir, read_config(model_dir), concurrency=4, reference=ref, memory_bytes=3 * 2**30)
    (node,) = spec["cluster"]["nodes"]
    assert node["compute_score"] == 1.0 and node["memory_gb"] == 3.0
    assert spec["model"]["reference"] == {"tflops": 0.25, "mem_bandwidth_gbps": 12.0}
    assert spec["workload"] == {"prompt_tokens": 192, "max_new_tokens": 64, "batch_size": 4}  # 256 positions


def test_plan_this_machine_is_one_stage_over_every_unit(plan_doc: PlanDoc) -> None:
    (stage,) = plan_doc.stages
    assert (stage.start, stage.end) == (0, len(plan_doc.units))
    assert stage.compute_ms > 0
    # the free memory when it was planned: other jobs move it, the total bounds it
    assert 0 < plan_doc.nodes[0].memory_gb <= psutil.virtual_memory().total / 2**30


def test_plan_and_spec_together_are_refused(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="--plan or --spec"):
        resolve_plan(model_dir, plan=tmp_path / "p.json", spec=tmp_path / "s.yaml", concurrency=1)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--concurrency", "0"], "--concurrency: must be in [1, 4096], got 0"),
        (["--port", "70000"], "--port: must be in [0, 65535], got 70000"),
        (["--backend", "carrier-pigeon"], "--backend: unknown executor"),
        (["--request-timeout", "0"], "--request-timeout: must be a finite number in (0"),
        (["--threads", "100000"], "--threads: must be in [0, "),
    ],
)
def test_bad_flags_are_one_line_errors(model_dir: Path, args: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from noodle.cli.main import main

    assert main(["serve", "--model", str(model_dir), *args]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_spec_is_solved_at_start_up(model_dir: Path, tmp_path: Path) -> None:
    import yaml

    from bench.servebench import bench_spec

    spec = tmp_path / "lab.yaml"
    spec.write_text(yaml.safe_dump(bench_spec((model_dir / "config.json").resolve())))
    doc, source = resolve_plan(model_dir, plan=None, spec=spec, concurrency=4)
    assert source == f"spec {spec}"
    assert {s.node for s in doc.stages} <= {"desktop-gpu", "laptop-igpu", "nas-cpu"}
    assert doc.stages[0].start == 0 and doc.stages[-1].end == len(doc.units) == 6
