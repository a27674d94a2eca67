"""The stage runner's fixed work per step beyond its hook-timed units (what a joining worker reports)."""

from __future__ import annotations

import warnings
from pathlib import Path

from noodle.executors.overhead import measure_step_overhead, overhead_ranges
from noodle.models import init_model


def test_the_step_overhead_is_the_stage_runners_time_beyond_its_units(tmp_path: Path) -> None:
    """Measured against the real stage runner: a unit table that claims ~nothing leaves the runner's whole step
    as overhead; one that claims 100x more than the runner takes floors at 0."""
    assert overhead_ranges(6) == [(0, 2), (1, 2), (4, 6)] and overhead_ranges(3) == [(0, 2), (1, 2), (1, 3)]
    assert overhead_ranges(2) == [(0, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_dir = init_model("gpt2-tiny", tmp_path / "m", seed=0)

    def table(ms: float) -> dict:
        units = [{"name": f"u{i}", "decode_ms": {"1": ms}, "prefill_ms_per_token": ms} for i in range(6)]
        return {"batch_size": 1, "prompt_tokens": 8, "units": units}

    nothing = measure_step_overhead(model_dir, table(1e-9), decode_tokens=3, repeats=2)
    assert nothing["decode_ms"] > 0.005 and nothing["prefill_ms"] > nothing["decode_ms"]
    huge = measure_step_overhead(model_dir, table(100 * nothing["decode_ms"] + 1.0), decode_tokens=3, repeats=2)
    assert huge == {"decode_ms": 0.0, "prefill_ms": 0.0}
