from __future__ import annotations

import json
import re

import pytest

from noodle.errors import SpecError
from noodle.profile import load_units
from noodle.types import Unit


def test_folder_jsonl_and_units_json_give_the_same_units(gpt2_profile):
    out, report, _ = gpt2_profile
    from_dir, meta = load_units(out)
    from_jsonl, meta_jsonl = load_units(out / "metrics.jsonl")
    from_json, _ = load_units(out / "units.json")
    assert from_dir == from_jsonl == from_json == report.units
    assert [u.name for u in from_dir] == ["embed", "block.0", "block.1", "block.2", "block.3", "lm_head"]
    assert all(isinstance(u, Unit) for u in from_dir)
    assert meta["model"] == "gpt2-tiny" and meta_jsonl["model"] == "gpt2-tiny"
    assert meta["reference_device"]["compute_score"] == 1.0
    assert meta["reference_device"]["description"].startswith("cpu: ")
    assert meta["workload"] == {"prompt_tokens": 12, "decode_tokens": 3, "batch_size": 1}
    assert meta["source"].endswith("units.json") and meta_jsonl["source"].endswith("metrics.jsonl")


def test_unit_values_follow_the_planner_contract(gpt2_profile):
    out, report, _ = gpt2_profile
    units, _ = load_units(out)
    decode = {r["name"]: r for r in report.rows_of("unit", "decode")}
    prefill = {r["name"]: r for r in report.rows_of("unit", "prefill")}
    for u in units:
        assert u.latency_ms == pytest.approx(decode[u.name]["latency_ms_p50"])
        assert u.prefill_ms_per_token == pytest.approx(prefill[u.name]["latency_ms_p50"] / 12)
        assert u.param_bytes == decode[u.name]["param_bytes"]
    assert [u.activation_bytes for u in units] == [64 * 4] * 5 + [8]
    assert [u.kv_bytes_per_token for u in units] == [0, 512, 512, 512, 512, 0]


def _write_units(tmp_path, mutate):
    doc = json.loads((tmp_path / "src" / "units.json").read_text())
    mutate(doc)
    path = tmp_path / "units.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def profile_copy(gpt2_profile, tmp_path):
    out, _, _ = gpt2_profile
    (tmp_path / "src").mkdir()
    for name in ("units.json", "metrics.jsonl"):
        (tmp_path / "src" / name).write_text((out / name).read_text())
    return tmp_path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["units"][2].__setitem__("latency_ms", -1), "units[2].latency_ms: must be a number >= 0, got -1"),
        (lambda d: d["units"][1].pop("param_bytes"), "units[1].param_bytes: missing"),
        (lambda d: d["units"][0].__setitem__("kv_bytes_per_token", 1.5), "units[0].kv_bytes_per_token: must be a whole number"),
        (lambda d: d["units"].reverse(), "units[0].name: expected 'embed' (units in chain order), got 'lm_head'"),
        (lambda d: d.__setitem__("units", d["units"][:2]), "expected embed, at least one block and lm_head, got 2"),
        (lambda d: d.pop("units"), "expected an object with a 'units' list"),
        (lambda d: d.pop("reference_device"), "reference_device: missing"),
    ],
)
def test_malformed_units_json(profile_copy, mutate, message):
    path = _write_units(profile_copy, mutate)
    with pytest.raises(SpecError, match=re.escape(message)):
        load_units(path)


def test_missing_and_malformed_profiles(profile_copy):
    with pytest.raises(SpecError, match="no such profile file"):
        load_units(profile_copy / "nope" / "metrics.jsonl")
    (profile_copy / "empty").mkdir()
    with pytest.raises(SpecError, match="no profile there"):
        load_units(profile_copy / "empty")
    bad = profile_copy / "bad.jsonl"
    bad.write_text('{"kind": "run"}\n{not json\n')
    with pytest.raises(SpecError, match="bad.jsonl: line 2: not JSON"):
        load_units(bad)
    rows = (profile_copy / "src" / "metrics.jsonl").read_text().splitlines()
    headless = profile_copy / "headless.jsonl"
    headless.write_text("\n".join(rows[1:]))
    with pytest.raises(SpecError, match="no 'run' row"):
        load_units(headless)
    partial = profile_copy / "partial.jsonl"
    partial.write_text("\n".join(r for r in rows if '"name":"block.1","phase":"decode"' not in r))
    with pytest.raises(SpecError, match="unit 'block.1': no decode and prefill rows"):
        load_units(partial)
    notjson = profile_copy / "units-bad.json"
    notjson.write_text("[1, 2")
    with pytest.raises(SpecError, match="not a readable JSON profile"):
        load_units(notjson)


def test_a_spec_pointing_at_the_profile_solves(gpt2_profile, tmp_path):
    """`model: {profile: ...}` feeds the measured units to the solver (folder and metrics.jsonl alike)."""
    import yaml

    from noodle import load_spec, solve
    from noodle.profile import load_units

    folder = gpt2_profile[0]
    units, _meta = load_units(folder)
    for target in (folder, folder / "metrics.jsonl"):
        spec = {
            "name": "profiled",
            "model": {"profile": str(target)},
            "workload": {"prompt_tokens": 8, "max_new_tokens": 4},
            "cluster": {"nodes": [
                {"id": "fast", "memory_gb": 1, "compute_score": 2.0},
                {"id": "slow", "memory_gb": 1, "compute_score": 1.0},
            ]},
            "objective": "latency",
        }
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        _spec, problem = load_spec(path)
        assert [u.name for u in problem.units] == [u.name for u in units]
        assert [u.latency_ms for u in problem.units] == [u.latency_ms for u in units]
        result = solve(problem, solver="auto", time_limit_s=10)
        assert result.status == "optimal"
        # everything fits on the fast node, and any split only adds hops: one stage there
        assert result.plan.nodes == ["fast"]
        assert result.objective_ms == pytest.approx(sum(u.latency_ms for u in units) / 2.0)
