"""The torchrpc ring pipelined: many groups in flight round the ring, a killed rank respawned with none lost."""

from __future__ import annotations

import threading

from noodle.executors.failover import RetryPolicy
from noodle.executors.ring.coordinator import TorchRpcExecutor

from .conformance import alone, plan_for, random_requests

POLICY = RetryPolicy(step_timeout_s=20.0, health_timeout_s=1.0)




def test_sixteen_in_flight_round_the_ring_then_a_killed_rank_is_respawned(tiny_models, spawner):
    model = tiny_models["llama"]
    ex = TorchRpcExecutor(plan_for(model, [0, 2, 4, 6]), model, threads=1, policy=POLICY, restarts=1, log=lambda _: None)
    with ex:
        work = random_requests(16, seed=21)
        with ex.pipeline(concurrency=6, prefill_chunk=5) as pipe:
            comps = [h.result(timeout=120) for h in [pipe.submit(p, max_new_tokens=n) for p, n in work]]
        for (p, n), c in zip(work, comps):
            assert c.tokens == alone(model, p, n)

        work = random_requests(8, seed=22)
        victim = ex._procs[1]
        count, lock = [0], threading.Lock()

        def on_token(_: int) -> None:
            with lock:
                count[0] += 1
                if count[0] == 6:
                    victim.kill()

        with ex.pipeline(concurrency=4) as pipe:
            comps = [h.result(timeout=180) for h in [pipe.submit(p, max_new_tokens=n, on_token=on_token) for p, n in work]]
        events = list(ex.failovers)
    assert [c.finish_reason for c in comps].count("error") == 0, [c.error for c in comps]
    for (p, n), c in zip(work, comps):
        assert c.tokens == alone(model, p, n)
    (ev,) = events
    assert ev.action == "restarted" and ev.replayed_steps >= 1


def test_cli_concurrency_on_the_ring_reports_every_planned_stage(tiny_models, spawner, tmp_path, capsys):
    import json

    from noodle.cli.main import main
    from noodle.plandoc import dump_plan

    model = tiny_models["gpt2"]
    plan = tmp_path / "plan.json"
    plan.write_text(dump_plan(plan_for(model, [0, 2, 4, 6])))
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(",".join(map(str, p)) for p, _ in random_requests(5, seed=3)) + "\n")
    rc = main(["exec", str(plan), "--model", str(model), "--backend", "torchrpc", "--batch-ids", str(ids), "-n", "4",
               "--concurrency", "3", "--threads", "1", "--format", "json"])  # fmt: skip
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    for (p, _), got in zip(random_requests(5, seed=3), data["tokens"]):
        assert got == alone(model, p, 4)
    rep = data["report"]
    assert rep["backend"] == "torchrpc" and [s["node"] for s in rep["stages"]] == ["node0", "node1", "node2"]
    assert rep["tokens_per_s"] > 0 and rep["peak_in_flight"] >= 1
