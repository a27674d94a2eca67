"""Stages in weight formats: the local executor loads each stage in its plan format; others refuse."""

from __future__ import annotations

import grpc
import pytest
import torch

from noodle.errors import ExecutorError
from noodle.executors import check_formats
from noodle.executors.local import LocalExecutor
from noodle.executors.messages import StageInput
from noodle.executors.stage import StageRunner
from noodle.plandoc import PlanDoc

from .conformance import plan_for, reference


def _with_formats(plan: PlanDoc, formats: list[str]) -> PlanDoc:
    stages = [st.model_copy(update={"format": f}) for st, f in zip(plan.stages, formats)]
    return plan.model_copy(update={"stages": stages})


def _logits(model, fmt: str) -> torch.Tensor:
    st = StageRunner(model, 0, 6, format=fmt)
    return st.step(StageInput("s", torch.tensor([[1, 5, 9, 14, 3]]), None, prefill=True, all_logits=True)).data


def test_formats_keep_logits_close_and_shrink_weights(tiny_models):
    model = tiny_models["llama"]
    ref = _logits(model, "float32")
    for fmt, tol in (("bfloat16", 0.05), ("int8", 0.05), ("int4", 0.3)):
        got = _logits(model, fmt)
        assert got.dtype == torch.float32  # activations and logits leave a stage in float32
        rel = float((got - ref).norm() / ref.norm())
        assert 0 < rel < tol, fmt  # changed (really quantized), but close
    # int8 / int4 shrink the Linears torch's kernels take; the tiny model's 172-wide MLP (not a multiple of 16)
    # stays float32 where the kernel cannot take it (int8: input width; int4: input and output widths)
    plain = StageRunner(model, 1, 5).param_bytes()
    assert StageRunner(model, 1, 5, format="int8").param_bytes() < plain / 2
    int4 = StageRunner(model, 1, 5, format="int4")
    assert int4.param_bytes() < plain
    kinds = {name: type(mod).__name__ for name, mod in int4.slice.blocks[0][1].named_modules()}
    assert kinds["self_attn.q_proj"] == "WeightOnlyLinear" and kinds["mlp.down_proj"] == "Linear"


def test_local_runs_a_mixed_format_plan(tiny_models):
    model = tiny_models["llama"]
    prompts = [[1, 5, 9, 14], [2, 7, 11, 4]]
    plan = _with_formats(plan_for(model, [0, 2, 4, 6]), ["int8", "bfloat16", "int4"])
    with LocalExecutor(plan, model) as ex:
        assert [s.format for s in ex.stages] == ["int8", "bfloat16", "int4"]
        res = ex.generate(prompts, max_new_tokens=6)
    want, _ = reference(model, prompts, 6)
    assert [len(t) for t in res.tokens] == [len(t) for t in want]
    same = sum(a == b for got, w in zip(res.tokens, want) for a, b in zip(got, w))
    assert same >= 1  # quantized: not bit-identical, but the greedy path starts alike


def test_formats_a_device_or_backend_cannot_run_are_refused_in_one_line(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(ExecutorError, match="format int4 cannot run on mps device 'mps': torch has no int4") as e:
        StageRunner(model, 0, 3, format="int4", device="mps")
    assert "\n" not in str(e.value)
    with pytest.raises(ExecutorError, match="unknown format 'int3'"):
        StageRunner(model, 0, 3, format="int3")
    int8 = _with_formats(plan_for(model, [0, 3, 6]), ["int8", "float32"])
    check_formats(int8, "local")
    check_formats(int8, "grpc")  # remote workers load the format (and refuse one their device cannot run)
    check_formats(int8, "torchrpc", devices=["cpu", "cpu"])
    with pytest.raises(ExecutorError, match=r"stages\.0\.format \(node0, run on this machine's mps\): format int8"):
        check_formats(int8, "torchrpc", devices=["mps", "cpu"])


def test_torchrpc_ranks_load_each_stage_in_its_plan_format(tiny_models):
    from noodle.executors.ring.coordinator import TorchRpcExecutor

    model = tiny_models["llama"]
    plan = _with_formats(plan_for(model, [0, 3, 6]), ["int8", "bfloat16"])
    prompts = [[5, 17, 99, 42], [7, 8, 9]]
    with LocalExecutor(plan, model) as ex:
        want = [ex.generate([p], max_new_tokens=6).tokens[0] for p in prompts]
    with TorchRpcExecutor(plan, model, threads=1) as ex:
        with ex.pipeline(concurrency=2, batching="continuous") as pipe:
            got = [h.result(timeout=120).tokens for h in [pipe.submit(p, max_new_tokens=6) for p in prompts]]
    assert got == want


@pytest.mark.parametrize("batching", ["groups", "continuous"])
def test_grpc_workers_load_each_stage_in_its_plan_format(tiny_models, batching):
    from noodle.executors.grpc import stage_service_pb2 as pb
    from noodle.executors.grpc.coordinator import GrpcExecutor

    from .inprocess import Server

    model = tiny_models["llama"]
    plan = _with_formats(plan_for(model, [0, 3, 6]), ["int8", "bfloat16"])
    prompts = [[5, 17, 99, 42], [7, 8, 9]]
    with LocalExecutor(plan, model) as ex:
        want = [ex.generate([p], max_new_tokens=6).tokens[0] for p in prompts]
    s = Server(model)
    try:
        with GrpcExecutor(plan, model, workers={"node0": s.address, "node1": s.address}) as ex:
            with ex.pipeline(concurrency=2, batching=batching) as pipe:
                got = [h.result(timeout=120).tokens for h in [pipe.submit(p, max_new_tokens=6) for p in prompts]]
        formats = sorted(st.format for st in s.servicer.stages.values())
        assert formats == ["bfloat16", "int8"]
        bad = pb.LoadStageRequest(start=0, end=3, format="int3")
        with pytest.raises(grpc.RpcError) as err:
            s.stub.LoadStage(bad, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "format: unknown format 'int3'" in err.value.details()
    finally:
        s.close()
    assert got == want, "the same formats on the same CPU give the same tokens in one process and over gRPC"


def test_old_plans_without_format_load_as_float32(tiny_models):
    plan = plan_for(tiny_models["llama"], [0, 6])
    data = plan.as_dict()
    for st in data["stages"]:
        del st["format"]
    assert PlanDoc.model_validate(data).stages[0].format == "float32"
