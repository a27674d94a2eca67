"""A node's unit costs measured with the profiler engine (what a joining worker reports), and their cache."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from noodle.errors import SpecError
from noodle.models import layout_of
from noodle.profile import load_units
from noodle.profile.unitcosts import UNIT_COSTS_FORMAT, measure_unit_costs


def test_units_timed_at_each_batch_size(gpt2_tiny, tmp_path: Path) -> None:
    costs = measure_unit_costs(gpt2_tiny, batch_sizes=(1, 2), prompt_tokens=8, decode_tokens=2, iterations=2,
                               out_dir=tmp_path)  # fmt: skip
    names = layout_of(gpt2_tiny).unit_names
    assert costs["format"] == UNIT_COSTS_FORMAT and costs["batch_size"] == 1 and costs["prompt_tokens"] == 8
    assert [u["name"] for u in costs["units"]] == names
    assert all(set(u["decode_ms"]) == {"1", "2"} and min(u["decode_ms"].values()) > 0 for u in costs["units"])
    assert all(u["prefill_ms_per_token"] > 0 for u in costs["units"])
    blocks = [u for u in costs["units"] if u["name"].startswith("block.")]
    assert all(u["kv_bytes_per_token"] > 0 and u["param_bytes"] > 0 for u in blocks)
    assert costs["units"][0]["kv_bytes_per_token"] == 0
    # the profile folder of the batch-1 run is the profiler's own output, readable by the planner
    units, _ = load_units(tmp_path / "b1")
    assert [u.latency_ms for u in units] == [u["decode_ms"]["1"] for u in costs["units"]]


def test_bad_batch_sizes_and_devices_are_refused(gpt2_tiny) -> None:
    with pytest.raises(SpecError, match="batch_sizes"):
        measure_unit_costs(gpt2_tiny, batch_sizes=(0,))
    with pytest.raises(SpecError, match="--device: 'mps'"):
        measure_unit_costs(gpt2_tiny, device="mps")


def test_self_report_caches_and_remeasures_an_older_format(tmp_path: Path) -> None:
    from noodle.models import init_model
    from noodle.serve.joining import self_report, whole_model_ms

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_dir = init_model("gpt2-tiny", tmp_path / "m", seed=0)
    first = self_report(model_dir, "cpu", tmp_path / "cache")
    assert first["costs"]["cached"] is False and first["costs"]["format"] == UNIT_COSTS_FORMAT
    again = self_report(model_dir, "cpu", tmp_path / "cache")
    assert again["costs"]["cached"] is True and again["costs"]["units"] == first["costs"]["units"]
    decode, prefill = whole_model_ms(again["costs"])
    assert decode == pytest.approx(sum(u["decode_ms"]["1"] for u in first["costs"]["units"])) and prefill > 0
    path = Path(first["cache_file"])
    path.write_text(json.dumps({"decode_ms": 1.0, "prefill_ms_per_token": 0.1, "prompt_tokens": 32}))  # older format
    redone = self_report(model_dir, "cpu", tmp_path / "cache")
    assert redone["costs"]["cached"] is False and len(redone["costs"]["units"]) == len(first["costs"]["units"])
    assert json.loads(path.read_text())["format"] == UNIT_COSTS_FORMAT
    overhead = redone["costs"]["step_overhead_ms"]
    assert set(overhead) == {"decode_ms", "prefill_ms"} and min(overhead.values()) >= 0
    stale = {k: v for k, v in redone["costs"].items() if k != "step_overhead_ms"}  # a cache from before the overhead
    path.write_text(json.dumps(stale))
    assert "step_overhead_ms" in self_report(model_dir, "cpu", tmp_path / "cache")["costs"]


def test_a_worker_slowed_from_the_start_reports_itself_slowed() -> None:
    from noodle.serve.joining import slowed_report, whole_model_ms
    from noodle.serve.registry import CostReport

    units = [{"name": n, "decode_ms": {"1": ms}, "prefill_ms_per_token": ms / 10, "param_bytes": 8, "kv_bytes_per_token": 0}
             for n, ms in (("embed", 0.1), ("block.0", 0.3))]  # fmt: skip
    report = {"device": {"kind": "cpu"}, "costs": {"format": "noodle.unit-costs/1", "batch_size": 1, "prompt_tokens": 32,
                                                   "units": units, "cached": True}}  # fmt: skip
    assert slowed_report(report, 1.0) is report
    slow = slowed_report(report, 4.0)
    assert whole_model_ms(slow["costs"]) == pytest.approx(tuple(4 * x for x in whole_model_ms(report["costs"])))
    assert slow["costs"]["emulated_slowdown"] == 4.0 and report["costs"]["units"][0]["decode_ms"]["1"] == 0.1  # a copy
    wire = CostReport.model_validate(slow["costs"])  # the coordinator takes it (the extra field is ignored)
    assert wire.profile("join").latency_ms == pytest.approx((0.4, 1.2))
