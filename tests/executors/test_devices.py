"""Which device each stage runs on, and which torch.distributed backend a ring takes (CUDA faked where absent)."""

from __future__ import annotations

import pytest
import torch

from noodle.errors import SpecError
from noodle.executors.devices import gpu_indices, is_gpu, ring_backend, stage_devices
from noodle.executors.local import LocalExecutor

from .conformance import alone, plan_for


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` CUDA devices (only the counting functions; nothing runs on them)."""

    def fake(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return fake


def test_gpu_words():
    assert all(is_gpu(d) for d in ("gpu", "cuda", "cuda:1", "desktop-GPU", "igpu"))
    assert not any(is_gpu(d) for d in ("cpu", "mps", "npu"))


def test_gpu_stages_take_the_gpus_round_robin(gpus):
    gpus(0)
    assert gpu_indices(["gpu", "cpu"]) == [-1, -1]
    gpus(2)
    assert gpu_indices(["gpu", "cpu", "gpu", "gpu"]) == [0, -1, 1, 0]
    assert gpu_indices(["gpu", "gpu"], reserve_first=True) == [0, 1], "two GPUs are not enough to spare one"
    gpus(3)
    assert gpu_indices(["gpu", "gpu"], reserve_first=True) == [1, 2]
    assert gpu_indices(["cuda:2", "gpu", "cuda:7"]) == [2, 0, 1], "a named GPU is taken as named (when it exists)"


def test_stage_devices_say_when_a_gpu_stage_runs_on_the_cpu(gpus):
    gpus(0)
    devs, note = stage_devices(["gpu", "cpu"])
    assert devs == [torch.device("cpu")] * 2
    assert note is not None and "gpu stage(s) run on this machine's CPU: it has no CUDA device" in note
    assert stage_devices(["cpu", "cpu"]) == ([torch.device("cpu")] * 2, None)
    gpus(1)
    devs, note = stage_devices(["gpu", "cpu", "gpu"])
    assert devs == [torch.device("cuda", 0), torch.device("cpu"), torch.device("cuda", 0)] and note is None


@pytest.mark.parametrize("gpus_of_stages,available,want", [
    ([0, 0], True, "gloo"),     # two stages on one GPU (the NCCL 'invalid usage')
    ([1, 1], True, "gloo"),     # still sharing
    ([0, 1], True, "gloo"),     # stage 0 on the coordinator's GPU 0
    ([1, 2], True, "nccl"),     # coordinator on 0, stages on 1 and 2
    ([1, -1], True, "gloo"),    # a CPU stage
    ([1, 2], False, "gloo"),    # no NCCL in this torch
])  # fmt: skip
def test_ring_takes_nccl_only_between_distinct_gpus(gpus_of_stages, available, want):
    backend, reason = ring_backend("auto", gpus_of_stages, nccl_available=available)
    assert backend == want and reason.startswith(want) and "\n" not in reason


def test_asking_nccl_for_a_shared_gpu_is_refused_in_one_line():
    with pytest.raises(SpecError, match="nccl needs one distinct GPU per rank; the coordinator and 2 stage"):
        ring_backend("nccl", [0, 0], nccl_available=True)
    assert ring_backend("gloo", [0, 0], nccl_available=True)[0] == "gloo"
    assert ring_backend("nccl", [1, 2], nccl_available=True)[0] == "nccl"
    with pytest.raises(SpecError, match="this torch has no NCCL"):
        ring_backend("nccl", [1, 2], nccl_available=False)


def test_local_runs_a_gpu_plan_on_the_cpu_and_says_so(tiny_models):
    model = tiny_models["llama"]
    plan = plan_for(model, [0, 3, 6])
    plan = plan.model_copy(update={"stages": [plan.stages[0].model_copy(update={"device": "gpu"}), plan.stages[1]]})
    said: list[str] = []
    with LocalExecutor(plan, model, log=said.append) as ex:
        if not torch.cuda.is_available():
            assert any("run on this machine's CPU" in s for s in said)
        got = ex.generate([[5, 17, 99]], max_new_tokens=5).tokens[0]
    assert got == alone(model, [5, 17, 99], 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batching", ["continuous", "exact"])
def test_local_hosts_a_cuda_stage_and_a_cpu_stage_in_one_process(tiny_models, batching):
    model = tiny_models["llama"]
    plan = plan_for(model, [0, 3, 6])
    plan = plan.model_copy(update={"stages": [plan.stages[0].model_copy(update={"device": "gpu"}), plan.stages[1]]})
    with LocalExecutor(plan, model) as ex:
        assert {p.device.type for m in ex.stages[0].slice.modules() for p in m.parameters()} == {"cuda"}
        assert {p.device.type for m in ex.stages[1].slice.modules() for p in m.parameters()} == {"cpu"}
        with ex.pipeline(concurrency=4, batching=batching) as pipe:
            done = [pipe.submit(p, max_new_tokens=6).result(timeout=120) for p in ([5, 17, 99], [7, 8], [300])]
    assert [c.tokens for c in done] == [alone(model, p, 6) for p in ([5, 17, 99], [7, 8], [300])]
