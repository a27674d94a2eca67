"""The torchrpc executor: worker processes on a torch.distributed ring on 127.0.0.1.

Two rings are started (Llama 3 stages, GPT-2 2 stages) and shared by the tests
of each; the tests that kill a rank come last in their ring's life.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from noodle.errors import ExecutorError
from noodle.executors import EXECUTORS
from noodle.executors.failover import RetryPolicy
from noodle.executors.ring.coordinator import TorchRpcExecutor

from .conformance import CUTS, PROMPT_SETS, check_executor, check_greedy_constrained, plan_for, reference
from .procs import SharedExecutor, children

POLICY = RetryPolicy(step_timeout_s=20.0)


@pytest.fixture(scope="module")
def llama_ring(tiny_models, spawner) -> Iterator[TorchRpcExecutor]:
    before = {p.pid for p in children()}
    ex = TorchRpcExecutor(plan_for(tiny_models["llama"], CUTS["3-stages"]), tiny_models["llama"], threads=1,
                          policy=POLICY, log=lambda _: None)  # fmt: skip
    with ex:
        yield ex
    assert not [c for c in children() if c.pid not in before], "ring workers left behind"


def test_registered():
    assert EXECUTORS.get("torchrpc") is TorchRpcExecutor


def test_conformance_llama_three_stages(tiny_models, llama_ring):
    shared = SharedExecutor(llama_ring, CUTS["3-stages"])
    check_executor(shared, tiny_models["llama"], CUTS["3-stages"], PROMPT_SETS["padded"])
    check_executor(shared, tiny_models["llama"], CUTS["3-stages"], PROMPT_SETS["batch1"])


def test_greedy_with_a_grammar_gets_logits_not_argmax_ids(tiny_models, llama_ring):
    check_greedy_constrained(llama_ring, tiny_models["llama"], PROMPT_SETS["batch1"][0])


def test_report_measures_the_ring(llama_ring):
    rep = llama_ring.generate(PROMPT_SETS["padded"], max_new_tokens=5).report
    assert llama_ring.backend == "gloo" and rep.backend == "torchrpc"
    assert [h.name for h in rep.hops] == ["coordinator->node0", "node0->node1", "node1->node2", "node2->coordinator"]
    # every decode-step message is one fixed-size buffer: the int64 header (16 + 5 per stage) and
    # room for a decode step of the planned batch (4 x 64 float32 + 3 int64 a row: the mask, or a packed
    # step's chunk table + 8)
    msg = 8 * (16 + 5 * 3) + 4 * 64 * 4 + 4 * 8 * 3 + 8
    assert llama_ring._ring.msg_bytes == msg
    assert [h.bytes_per_decode for h in rep.hops] == [msg] * 4
    prefill = 3 * 9 * 64 * 4 + 3 * 9 * 8  # batch 3 x 9 tokens: too big to go inline, a second message
    assert rep.hops[1].bytes_total == msg * 5 + prefill
    assert all(not h.relayed and h.transit_ms_p50 > 0 for h in rep.hops)
    (rtt,) = rep.rtts
    assert rtt.peer == "ring" and rtt.rtt_ms_p50 > 0 and rtt.ping_ms is not None
    assert 0 < rep.network_share < 1
    assert all(s.param_bytes > 0 and s.kv_cache_bytes > 0 and s.decode_ms_p50 > 0 for s in rep.stages)


def test_stage_error_comes_back_with_its_traceback_and_the_ring_goes_on(tiny_models, llama_ring):
    with pytest.raises(ExecutorError, match=r"stage on node0 \(rank 1\) failed") as err:
        llama_ring.generate([[5, 600]], max_new_tokens=2)  # 600 is outside the 512-token vocabulary
    assert err.value.remote_traceback and "Traceback" in err.value.remote_traceback
    assert "IndexError" in err.value.remote_traceback
    want = reference(tiny_models["llama"], PROMPT_SETS["batch1"], 3)[0]
    assert llama_ring.generate(PROMPT_SETS["batch1"], max_new_tokens=3).tokens == want


def test_lost_rank_without_restarts_is_a_clear_error_and_nothing_hangs(llama_ring):
    llama_ring.restarts = 0
    victim = llama_ring._procs[1]

    def kill(n: int) -> None:
        if n == 2:
            victim.kill()

    t0 = time.monotonic()
    with pytest.raises(ExecutorError, match="cannot replace a lost rank") as err:
        llama_ring.generate(PROMPT_SETS["batch1"], max_new_tokens=6, on_step=kill)
    assert time.monotonic() - t0 < POLICY.step_timeout_s
    assert "rank 2 (node1) exited with code -9" in str(err.value)
    assert not llama_ring._procs and llama_ring._ring is None  # the rest of the world was stopped


def test_gpt2_conformance_then_a_killed_worker_is_respawned(tiny_models, spawner):
    before = {p.pid for p in children()}
    model = tiny_models["gpt2"]
    cuts = CUTS["rest|head"]
    ex = TorchRpcExecutor(plan_for(model, cuts), model, threads=1, policy=POLICY, restarts=1, log=lambda _: None)
    with ex:
        check_executor(SharedExecutor(ex, cuts), model, cuts, PROMPT_SETS["padded"])
        victim = ex._procs[1]
        res = ex.generate(PROMPT_SETS["padded"], max_new_tokens=8, on_step=lambda n: n == 3 and victim.kill())
        assert victim.returncode == -9
        after = ex.generate(PROMPT_SETS["batch1"], max_new_tokens=4)
    assert res.tokens == reference(model, PROMPT_SETS["padded"], 8)[0]
    (ev,) = res.report.failovers
    assert ev.action == "restarted" and ev.step == 4 and ev.replayed_steps == 3 and "rank 2" in ev.node
    assert after.tokens == reference(model, PROMPT_SETS["batch1"], 4)[0]
    assert not [c for c in children() if c.pid not in before]


def test_joining_a_world_from_the_environment_and_losing_a_rank(tiny_models, spawner, monkeypatch):
    """The several-machines path (RANK/WORLD_SIZE set, workers started elsewhere), on one machine."""
    import socket

    from noodle.executors.ring.worker import run_worker
    from noodle.executors.spawner import spawn

    model = tiny_models["llama"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "3", "RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    workers = [spawn(run_worker, str(model), threads=1, timeout_s=60.0, join=("127.0.0.1", port, r, 3)) for r in (1, 2)]
    try:
        ex = TorchRpcExecutor(plan_for(model, CUTS["rest|head"]), model, policy=POLICY, log=lambda _: None)
        assert not ex.spawn
        with ex:
            assert ex.generate(PROMPT_SETS["batch1"], max_new_tokens=4).tokens == reference(model, PROMPT_SETS["batch1"], 4)[0]
            with pytest.raises(ExecutorError, match="cannot replace a lost rank") as err:
                ex.generate(PROMPT_SETS["batch1"], max_new_tokens=6, on_step=lambda n: n == 2 and workers[0].kill())
        # the coordinator's own send to rank 1 fails, or rank 2 reports that rank 1 is gone: either names it
        assert "rank 1" in str(err.value) and "node0" in str(err.value)
        assert workers[1].wait(timeout=30) == 4  # the survivor reported the loss and left
    finally:
        for w in workers:
            w.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_stage_on_cuda_matches_cpu(tiny_models):
    from noodle.executors.devices import DeviceStageRunner
    from noodle.executors.messages import StageInput
    from noodle.executors.stage import StageRunner

    model = tiny_models["llama"]
    ids = torch.tensor([[5, 17, 99, 42]])
    mask = torch.tensor([[0, 1, 1, 1]])
    cpu = StageRunner(model, 0, 6).step(StageInput("s", ids, mask, prefill=True))
    gpu = DeviceStageRunner(model, 0, 6, device=torch.device("cuda")).step(StageInput("s", ids, mask, prefill=True))
    torch.testing.assert_close(gpu.data.cpu(), cpu.data, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 3, reason="NCCL needs a GPU per rank (coordinator + 2 stages)")
def test_nccl_ring_matches_generate(tiny_models):
    model = tiny_models["llama"]
    plan = plan_for(model, CUTS["rest|head"])
    plan = plan.model_copy(update={"stages": [s.model_copy(update={"device": "gpu"}) for s in plan.stages]})
    with TorchRpcExecutor(plan, model, backend="nccl", threads=1) as ex:
        res = ex.generate(PROMPT_SETS["padded"], max_new_tokens=6)
    assert res.tokens == reference(model, PROMPT_SETS["padded"], 6)[0]
