"""Issue 13's "Done when": ``noodle serve --cluster`` and ``noodle worker --join`` *processes* on 127.0.0.1.

No cluster figure is written by hand: the workers' costs are measured on this machine (once,
into the cache every worker then reads, so the workers are described alike), the coordinator
plans over what joined, and requests go through the official ``openai`` client. The tests
check the tokens against the local executor's, through:

(a) a killed worker (SIGKILL) that holds a stage: re-plan, requests still complete;
(b) joins: one that pays (a fourth node) is planned in, one whose predicted gain stays under
    ``--replan-threshold`` (a fifth) keeps the plan (hysteresis);
(c) a worker that slows down mid-run (``--emulate-slowdown``): drift is noticed and the
    coordinator moves units off it;
(d) a worker whose cached costs claim it is 4x faster than it is (a stale cache): measured !=
    predicted should make the coordinator re-plan (needs the measured-vs-predicted feedback).

Every process is stopped (``ClusterLab`` stops them on exit, killing any that does not stop).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.cluster import PROMPT, ClusterLab, Load, _stages, measure_cache, wait_for

pytestmark = pytest.mark.slow

ARGS = ["--min-workers", "3", "--heartbeat-timeout", "2", "--concurrency", "4"]


@pytest.fixture(scope="module")
def cache(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This machine's measured costs, as a joining worker with 1 thread caches them."""
    folder = tmp_path_factory.mktemp("costs")
    measure_cache(model_dir, folder)
    return folder


@pytest.fixture(scope="module")
def expected(tokenizer: Any, reference: Callable[..., list[int]]) -> str:
    ids = list(tokenizer(PROMPT)["input_ids"])
    return str(tokenizer.decode(reference(ids, 12), skip_special_tokens=True))


def _units(layout: str, node: str) -> int:
    return sum(s["end"] - s["start"] for s in _stages(layout) if s["node"] == node)


def test_joins_replan_only_when_it_pays_and_a_kill_replans(model_dir: Path, tmp_path: Path, cache: Path,
                                                          expected: str) -> None:  # fmt: skip
    with ClusterLab(model_dir, tmp_path, ARGS) as lab:
        for name in ("w1", "w2", "w3"):
            lab.worker(name, cache)
        lab.wait_ready()
        status = lab.cluster()
        assert sorted(n["id"] for n in status["nodes"]) == ["w1", "w2", "w3"]
        assert all(n["cached"] and n["decode_ms"] > 0 for n in status["nodes"])  # measured above, read from the cache
        assert len({n["decode_ms"] for n in status["nodes"]}) == 1
        with Load(lab.base) as load:
            wait_for(lambda: len(load.done) >= 8, 60, "requests to complete")
            # (b) a fourth node pays (more stages in the pipeline): planned in
            t_w4 = time.time()
            lab.worker("w4", cache)
            joined = wait_for(lambda: lab.replans(t_w4, "nodes"), 120, "w4 to be planned in")[0]
            assert joined["after_tps"] > joined["current_tps"] * 1.10 and joined["moved_units"] >= 1
            assert "w4" in joined["after"]
            wait_for(lambda: load.first_after(joined["t"]), 60, "a request on the joined plan")
            # ... a fifth does not (no better plan with it): weighed once, the plan is kept (hysteresis)
            t_w5 = time.time()
            lab.worker("w5", cache)
            kept = wait_for(lambda: [e for e in lab.events() if e["t"] > t_w5 and e["message"].startswith("nodes changed")]
                            or lab.replans(t_w5, "nodes"), 120, "w5 to be weighed")  # fmt: skip
            assert "message" in kept[0] and "keeping" in kept[0]["message"], f"a join that does not pay switched: {kept[0]}"
            assert lab.replans(t_w5, "nodes") == []  # (drift on this busy machine may still re-plan)
            # (a) a worker that holds a stage is killed: requests sent during the outage still complete
            victim = _stages(lab.cluster()["plan"])[-1]["node"]  # drift may have moved stages since the join
            t_kill = lab.kill(victim)
            left = wait_for(lambda: [r for r in lab.replans(t_kill) if victim in r["reason"]], 60, "a re-plan")[0]
            assert victim not in left["after"]
            wait_for(lambda: load.first_after(left["t"]), 60, "a request on the new plan")
        assert load.errors == []
        assert load.texts() == {expected}, "every completion must equal the local executor's tokens"
        assert "cached decode" in lab.log("w5")


def test_a_slowed_worker_is_noticed_and_units_move_off_it(model_dir: Path, tmp_path: Path, cache: Path,
                                                          expected: str) -> None:  # fmt: skip
    with ClusterLab(model_dir, tmp_path, ARGS) as lab:
        lab.worker("w1", cache)
        lab.worker("w2", cache, "--emulate-slowdown", "10", "--slowdown-after-s", "8")
        lab.worker("w3", cache)
        lab.wait_ready()
        assert "emulating a 10x slowdown" in lab.log("w2")
        before = lab.cluster()["plan"]
        assert _units(before, "w2") >= 1
        with Load(lab.base) as load:
            t_thr = wait_for(lambda: lab.throttled_at("w2"), 90, "w2 to throttle")
            drift = wait_for(lambda: [r for r in lab.replans(t_thr, "drift") if "w2" in r["reason"]], 120,
                             "a drift re-plan for w2")[0]  # fmt: skip
            assert _units(drift["after"], "w2") < _units(before, "w2")
            node = next(n for n in lab.cluster()["nodes"] if n["id"] == "w2")
            assert node["drift"] > 1.15
            wait_for(lambda: load.first_after(drift["t"]), 60, "a request on the adapted plan")
        assert load.errors == []
        assert load.texts() == {expected}


@pytest.mark.xfail(strict=False, reason="needs measured-vs-predicted per-stage feedback (branch `costs`); drift on "
                   "main compares a stage with its own first steps, so a worker described too fast from the start is "
                   "not noticed")  # fmt: skip
def test_a_worker_described_too_fast_is_noticed(model_dir: Path, tmp_path: Path, cache: Path, expected: str) -> None:
    stale = tmp_path / "stale-cache"
    shutil.copytree(cache, stale)
    for f in stale.glob("*.json"):  # a stale cache: measured on a faster machine, 4x faster than this one
        costs = json.loads(f.read_text())
        costs["decode_ms"] /= 4
        costs["prefill_ms_per_token"] /= 4
        f.write_text(json.dumps(costs))
    with ClusterLab(model_dir, tmp_path, ARGS) as lab:
        lab.worker("w1", cache)
        lab.worker("w2", cache)
        lab.worker("w3", stale)
        lab.wait_ready()
        before = lab.cluster()["plan"]
        assert _units(before, "w3") >= 1
        with Load(lab.base) as load:
            t0 = time.time()
            fixed = wait_for(lambda: [r for r in lab.replans(t0) if "w3" in r["reason"]], 60, "a re-plan naming w3")[0]
            assert _units(fixed["after"], "w3") < _units(before, "w3")
        assert load.errors == []
        assert load.texts() == {expected}
