"""The embedded plan: this machine alone, measured (memory from psutil, speed from torch timings)."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from noodle.errors import SpecError
from noodle.models.analytic import ReferenceDevice
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
    # 256 positions; the serving default batches continuously: 4 streams
    assert spec["workload"] == {"prompt_tokens": 192, "max_new_tokens": 64, "streams": 4}
    for batching, key in (("continuous", "streams"), ("groups", "batch_size"), ("exact", "batch_size")):
        spec = embedded_spec(model_dir, read_config(model_dir), concurrency=4, reference=ref, memory_bytes=3 * 2**30,
                             batching=batching)  # fmt: skip
        assert spec["workload"] == {"prompt_tokens": 192, "max_new_tokens": 64, key: 4}, batching


def test_this_machine_predicts_the_batched_pipeline_and_shows_it(model_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """16 streams on one stage: one step of all 16 per round, priced on the analytic batch curve."""
    from types import SimpleNamespace

    import noodle.serve.planning as planning
    from noodle.serve.metrics import ServeMetrics, predicted_tps

    monkeypatch.setattr(planning, "measure_reference", lambda seconds=0.15, device="cpu": ReferenceDevice(0.1, 10.0))
    doc, _ = planning.plan_this_machine(model_dir, concurrency=16)
    p = doc.predicted
    (stage,) = doc.stages
    assert (p.streams, p.step_batch) == (16, 16)
    assert p.round_ms == pytest.approx(stage.compute_ms, rel=1e-9)  # one stage, no hops
    assert p.pipeline_tokens_per_s == pytest.approx(16e3 / p.round_ms, rel=1e-9) == predicted_tps(doc)
    one = planning.plan_this_machine(model_dir, concurrency=1)[0].stages[0].compute_ms
    assert one < stage.compute_ms < 16 * one  # a batch of 16 costs more than one sequence, far less than 16 of them
    groups, _ = planning.plan_this_machine(model_dir, concurrency=16, batching="groups")
    assert groups.predicted.streams is None and groups.predicted.step_batch is None
    rt = SimpleNamespace(stats=lambda: None, state="ready")
    text = ServeMetrics(rt, doc).render().decode()
    assert f"noodle_plan_predicted_tokens_per_second {float(p.pipeline_tokens_per_s)}" in text
    assert "noodle_plan_streams 16.0" in text and "noodle_plan_step_batch 16.0" in text
    assert "noodle_plan_streams 0.0" in ServeMetrics(rt, groups).render().decode()


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
        (["--batching", "paged"], "--batching: must be one of auto, continuous, exact, groups, got 'paged'"),
        (["--max-batch-tokens", "0"], "--max-batch-tokens: must be in [1, "),
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


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, free_bytes: int, gpu_gbps: float, bf16: bool = True) -> None:
    """A CUDA device that only exists for the planner: its free memory and its measured bandwidth."""
    import torch

    import noodle.serve.planning as planning

    cpu_ref = ReferenceDevice(tflops=0.05, mem_bandwidth_gbps=10.0)
    gpu_ref = ReferenceDevice(tflops=50.0, mem_bandwidth_gbps=gpu_gbps)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (free_bytes, 2 * free_bytes))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(planning, "measure_reference", lambda seconds=0.15, device="cpu": gpu_ref if device != "cpu" else cpu_ref)


def test_a_gpu_machine_plans_its_gpu_and_its_cpu_as_two_nodes(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from noodle.serve.planning import plan_this_machine

    _fake_gpu(monkeypatch, free_bytes=8 * 2**30, gpu_gbps=1000.0)
    doc, measured = plan_this_machine(model_dir, concurrency=4)
    gpu_node, cpu_node = doc.nodes
    assert (gpu_node.device, cpu_node.device) == ("gpu", "cpu")
    assert gpu_node.compute_score == pytest.approx(100.0) and gpu_node.memory_gb == pytest.approx(8 * 0.9)
    (stage,) = doc.stages  # the model fits: all of it on the 100x faster GPU, in bfloat16
    assert stage.node == gpu_node.id and stage.format == "bfloat16" and "bfloat16 on the GPU" in stage.rationale
    assert measured["gpu"]["compute_score"] == pytest.approx(100.0)


def test_a_model_too_big_for_the_gpu_spills_units_to_the_cpu(model_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from noodle.serve.planning import plan_this_machine

    _fake_gpu(monkeypatch, free_bytes=2**40, gpu_gbps=1000.0)
    whole = plan_this_machine(model_dir, concurrency=1)[0].stages[0].memory_required_mb
    _fake_gpu(monkeypatch, free_bytes=int(whole * 2**20 * 0.6 / 0.9), gpu_gbps=1000.0, bf16=False)  # ~60 % fits
    doc, _ = plan_this_machine(model_dir, concurrency=1)
    assert sorted(st.device for st in doc.stages) == ["cpu", "gpu"], [(s.node, s.layers) for s in doc.stages]
    gpu = next(st for st in doc.stages if st.device == "gpu")
    assert gpu.memory_required_mb <= gpu.memory_available_mb and doc.stages[-1].end == len(doc.units)
    assert all(st.format == "float32" for st in doc.stages), "no bfloat16 where the GPU does not support it"
