"""The grpc executor against real worker processes on 127.0.0.1: same tokens as generate(), failover.

One pool of three worker processes with a token (one ``noodle worker`` subprocess
reading ``NOODLE_TOKEN``, two forked from the fork server) serves every test in
this module; the failover tests at the end stop or kill workers, so they run last.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from functools import partial

import grpc
import pytest

from noodle.errors import ExecutorError, SpecError
from noodle.executors.failover import RetryPolicy
from noodle.executors.grpc import stage_service_pb2 as pb
from noodle.executors.grpc import stage_service_pb2_grpc as pb_grpc
from noodle.executors.grpc.coordinator import GrpcExecutor
from noodle.executors.grpc.server import serve
from noodle.executors.grpc.worker import WorkerConfig

from .conformance import CUTS, PROMPT_SETS, check_executor, check_greedy_constrained, plan_for, reference
from .procs import WorkerPool, children

TOKEN = "test-token-3f9c"
FAST = RetryPolicy(step_timeout_s=3.0, health_timeout_s=0.5, attempts=2, backoff_s=0.05)


@pytest.fixture(scope="module")
def pool(tiny_models, spawner) -> Iterator[WorkerPool]:
    before = {p.pid for p in children()}
    p = WorkerPool(tiny_models["llama"], 3, token=TOKEN)
    try:
        yield p
    finally:
        p.close()
    assert not [c for c in children() if c.pid not in before], "worker processes left behind"


def workers_for(addresses: list[str]) -> dict[str, str]:
    return {f"node{i}": a for i, a in enumerate(addresses)}


def test_conformance_llama_three_stages_on_worker_processes(tiny_models, pool):
    addrs = [w.address for w in pool.workers[:3]]
    factory = partial(GrpcExecutor, workers=workers_for(addrs), token=TOKEN)
    check_executor(factory, tiny_models["llama"], CUTS["3-stages"], PROMPT_SETS["padded"])
    check_executor(factory, tiny_models["llama"], CUTS["embed|rest"], PROMPT_SETS["batch1"])


def test_greedy_with_a_grammar_gets_logits_not_argmax_ids(tiny_models, pool):
    model = tiny_models["llama"]
    addrs = workers_for([w.address for w in pool.workers[:3]])
    with GrpcExecutor(plan_for(model, CUTS["3-stages"]), model, workers=addrs, token=TOKEN) as ex:
        check_greedy_constrained(ex, model, PROMPT_SETS["batch1"][0])


def test_conformance_gpt2_two_stages(tiny_models):
    servers = [serve(WorkerConfig(model_dir=tiny_models["gpt2"], port=0)) for _ in range(2)]
    try:
        addrs = [f"127.0.0.1:{port}" for _, _, port in servers]
        factory = partial(GrpcExecutor, workers=workers_for(addrs), stream=False)  # unary calls too
        check_executor(factory, tiny_models["gpt2"], CUTS["rest|head"], PROMPT_SETS["padded"])
    finally:
        for server, servicer, _ in servers:
            server.stop(0)
            servicer.close()


def test_report_measures_every_hop(tiny_models, pool):
    model = tiny_models["llama"]
    plan = plan_for(model, CUTS["3-stages"])
    with GrpcExecutor(plan, model, workers=workers_for([w.address for w in pool.workers[:3]]), token=TOKEN) as ex:
        rep = ex.generate(PROMPT_SETS["padded"], max_new_tokens=5).report
    d = json.loads(json.dumps(rep.as_dict()))
    assert [h["name"] for h in d["hops"]] == [
        "coordinator->node0", "node0->node1", "node1->node2", "node2->coordinator"
    ]  # fmt: skip
    hidden_bytes = 3 * 64 * 4  # batch 3, one new token, float32
    for hop in d["hops"][1:3]:
        assert hop["relayed"] and hop["bytes_per_decode"] > 2 * hidden_bytes  # out to the coordinator and in again
        assert hop["transit_ms_p50"] > 0 and hop["serialize_ms_p50"] > 0 and hop["predicted_hop_ms"] == 0.0
    assert d["hops"][-1]["bytes_per_decode"] < 200  # greedy: the last stage sends token ids, not logits
    assert len(d["rtts"]) == 3 and all(r["rtt_ms_p50"] > 0 and r["ping_ms"] > 0 for r in d["rtts"])
    assert 0 < rep.network_share < 1 and rep.network_ms_p50 > 0
    assert all(s.kv_cache_bytes > 0 and s.param_bytes > 0 for s in rep.stages)
    assert rep.stages[0].hop_ms_p50 == pytest.approx(rep.hops[1].transit_ms_p50)
    assert not rep.failovers


def test_cli_exec_with_workers_from_the_environment(tiny_models, pool, tmp_path, monkeypatch, capsys):
    from noodle.cli.main import main
    from noodle.plandoc import dump_plan

    model = tiny_models["llama"]
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(dump_plan(plan_for(model, CUTS["rest|head"])))
    monkeypatch.setenv("NOODLE_WORKERS", ",".join(f"node{i}={w.address}" for i, w in enumerate(pool.workers[:2])))
    monkeypatch.setenv("NOODLE_TOKEN", TOKEN)
    code = main(["exec", str(plan_file), "--model", str(model), "--backend", "grpc", "--prompt-ids", "5,17,99,42",
                 "-n", "4", "--format", "json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["tokens"] == reference(model, [[5, 17, 99, 42]], 4)[0]
    assert out["report"]["backend"] == "grpc" and len(out["report"]["hops"]) == 3
    monkeypatch.delenv("NOODLE_WORKERS")
    monkeypatch.delenv("NOODLE_TOKEN")
    monkeypatch.setenv("COLUMNS", "200")
    workers = ",".join(f"node{i}={w.address}" for i, w in enumerate(pool.workers[:2]))
    code = main(["exec", str(plan_file), "--model", str(model), "--backend", "grpc", "--prompt-ids", "5,17,99,42",
                 "-n", "3", "--workers", workers, "--token", TOKEN, "--step-timeout", "30"])  # fmt: skip
    table = capsys.readouterr().out
    assert code == 0 and "node0->node1" in table and "planned hop ms" in table and "per decode step" in table
    assert main(["exec", str(plan_file), "--model", str(model), "--backend", "grpc", "--prompt-ids", "5",
                 "--workers", workers, "--token", TOKEN, "--step-timeout", "0"]) == 2  # fmt: skip
    assert "--step-timeout: must be > 0" in capsys.readouterr().err


def test_missing_token_or_address_is_refused(tiny_models, pool):
    model = tiny_models["llama"]
    plan = plan_for(model, CUTS["rest|head"])
    addrs = workers_for([w.address for w in pool.workers[:2]])
    with pytest.raises(ExecutorError, match="UNAUTHENTICATED|refused"):
        with GrpcExecutor(plan, model, workers=addrs, token="wrong"):
            pass
    with grpc.insecure_channel(pool.workers[0].address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.StageServiceStub(ch).Health(pb.HealthRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(SpecError, match="no address for node"):
        GrpcExecutor(plan, model, workers={"node0": addrs["node0"]})
    with pytest.raises(SpecError, match="HOST:PORT"):
        GrpcExecutor(plan, model, workers="node0=nowhere,node1=127.0.0.1:1")


# -- failover: these kill workers, so they come last ------------------------------------------------


def _kill_at(step: int, worker, how: str = "kill"):
    def on_step(n: int) -> None:
        if n == step:
            if how == "stop":
                worker.proc.send_signal(signal.SIGSTOP)
            else:
                worker.kill()

    return on_step


def test_hung_worker_is_detected_by_deadline_and_merged(tiny_models, pool):
    model = tiny_models["llama"]
    a, b, _ = pool.workers
    plan = plan_for(model, CUTS["rest|head"])
    want = reference(model, PROMPT_SETS["batch1"], 6)[0]
    with GrpcExecutor(plan, model, workers=workers_for([a.address, b.address]), token=TOKEN, policy=FAST,
                      log=lambda _: None) as ex:  # fmt: skip
        res = ex.generate(PROMPT_SETS["batch1"], max_new_tokens=6, on_step=_kill_at(2, b, how="stop"))
    b.proc.send_signal(signal.SIGCONT)  # b serves again for the next test
    assert res.tokens == want
    (ev,) = res.report.failovers
    assert ev.action == "merged" and "no reply within 3 s" in ev.reason and ev.node == "node1"
    assert [(s.start, s.end) for s in res.report.stages] == [(0, 6)]
    assert ev.seconds < 15


def test_dead_worker_moves_to_spare_and_tokens_match(tiny_models, pool):
    model = tiny_models["llama"]
    a, b, c = pool.workers
    plan = plan_for(model, CUTS["embed|rest"])
    want = reference(model, PROMPT_SETS["padded"], 8)[0]
    notes: list[str] = []
    with GrpcExecutor(plan, model, workers=workers_for([a.address, b.address]), spares=[c.address],
                      token=TOKEN, policy=FAST, log=notes.append) as ex:  # fmt: skip
        res = ex.generate(PROMPT_SETS["padded"], max_new_tokens=8, on_step=_kill_at(3, b))
    assert res.tokens == want
    (ev,) = res.report.failovers
    assert ev.action == "spare" and ev.node == "node1" and ev.step == 4 and ev.replayed_steps == 3
    assert c.address in ev.detail and len(res.report.stages) == 2
    assert any("failed at step 4" in n for n in notes)


def test_dead_worker_without_spare_is_merged_into_a_neighbour(tiny_models, pool):
    model = tiny_models["llama"]
    a, b, c = pool.workers
    assert a.alive and not b.alive and c.alive
    plan = plan_for(model, CUTS["3-stages"])
    want = reference(model, PROMPT_SETS["padded"], 8)[0]
    with GrpcExecutor(plan, model, workers=workers_for([a.address, c.address, a.address]), token=TOKEN, policy=FAST,
                      log=lambda _: None) as ex:  # fmt: skip
        res = ex.generate(PROMPT_SETS["padded"], max_new_tokens=8, on_step=_kill_at(2, c))
        again = ex.generate(PROMPT_SETS["padded"], max_new_tokens=8)  # the merged pipeline keeps working
    assert res.tokens == want and again.tokens == want
    (ev,) = res.report.failovers
    assert ev.action == "merged" and ev.node == "node1" and ev.replayed_steps in (1, 2)
    assert [(s.start, s.end) for s in res.report.stages] in ([(0, 4), (4, 6)], [(0, 2), (2, 6)])
    assert "not re-solved" in ex.plan.solver.note
