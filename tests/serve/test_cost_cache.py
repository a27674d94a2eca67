"""A joining worker's cached costs record the load they were measured under, and expire (issue 20, item 6)."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from noodle.serve.joining import BUSY_LOAD, CACHE_MAX_AGE_S, self_report, stale_reason


def test_the_rule_age_and_load() -> None:
    now = 1_000_000.0
    fresh = {"measured_at": now - 60, "load_per_cpu": 0.3}
    assert stale_reason(fresh, now=now, load=0.1) is None  # measured quiet: reused whatever the load now
    assert "h old" in stale_reason({**fresh, "measured_at": now - CACHE_MAX_AGE_S - 1}, now=now, load=0.3)
    busy = {"measured_at": now - 60, "load_per_cpu": 2 * BUSY_LOAD}
    assert stale_reason(busy, now=now, load=1.5 * BUSY_LOAD) is None  # still as busy: the figures still hold
    assert "under load 2.00 per CPU" in stale_reason(busy, now=now, load=BUSY_LOAD)  # half the load: measure again
    assert stale_reason({"units": []}, now=now, load=0.0) == "it records no time or load of measurement"


def test_self_report_records_the_load_and_measures_an_expired_file_again(tmp_path: Path) -> None:
    from noodle.models import init_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_dir = init_model("gpt2-tiny", tmp_path / "m", seed=0)
    t0 = time.time()
    first = self_report(model_dir, "cpu", tmp_path / "cache")["costs"]
    assert first["cached"] is False and t0 <= first["measured_at"] <= time.time() and first["load_per_cpu"] >= 0
    path = next((tmp_path / "cache").glob("*.json"))
    on_disk = json.loads(path.read_text())
    assert on_disk["measured_at"] == first["measured_at"] and on_disk["load_per_cpu"] == first["load_per_cpu"]
    on_disk["measured_at"] -= CACHE_MAX_AGE_S + 60  # a day and a minute ago
    on_disk["units"][0]["decode_ms"]["1"] = 12345.0  # a figure only the old file holds
    path.write_text(json.dumps(on_disk))
    redone = self_report(model_dir, "cpu", tmp_path / "cache")["costs"]
    assert redone["cached"] is False and redone["units"][0]["decode_ms"]["1"] != 12345.0
    assert redone["measured_at"] >= t0
