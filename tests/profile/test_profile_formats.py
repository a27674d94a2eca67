"""``noodle profile --formats``: per-format figures in units.json, read back by the planner's loader."""

from __future__ import annotations


from noodle.cli.main import main
from noodle.profile import load_units
from noodle.profile.units import format_units

FAST = ["--prompt-tokens", "8", "--decode-tokens", "2", "--warmup", "1", "--iterations", "2", "--module-iterations", "0"]


def test_profile_formats_writes_per_format_units(tmp_path, capsys):
    folder = tmp_path / "llama"
    assert main(["model", "init", "--preset", "llama-tiny", "--out", str(folder), "--seed", "1"]) == 0
    out = tmp_path / "prof"
    assert main(["profile", "--model", str(folder), "--out", str(out), "--no-dashboard", "--threads", "1",
                 "--formats", "float32,int8,bfloat16", *FAST]) == 0
    assert "format int8: profiled into" in capsys.readouterr().out
    units, meta = load_units(out)
    per = format_units(meta["formats"], units, meta["source"])
    assert sorted(per) == ["bfloat16", "int8"] and (out / "formats" / "int8" / "units.json").is_file()
    for fmt, mine in per.items():
        assert [u.name for u in mine] == [u.name for u in units]
        assert all(m.latency_ms > 0 for m in mine)
        assert [m.activation_bytes for m in mine] == [u.activation_bytes for u in units]  # activations stay float32
    assert [b.param_bytes * 2 for b in per["bfloat16"]] == [u.param_bytes - u.param_bytes % 2 for u in units]
    # int8 shrinks the blocks (their Linears torch's kernel takes) and the head, not the embedding
    assert per["int8"][0].param_bytes == units[0].param_bytes
    assert all(q.param_bytes < u.param_bytes for q, u in zip(per["int8"][1:], units[1:]))


def test_profile_formats_refuses_an_unknown_format_in_one_line(tmp_path, capsys):
    code = main(["profile", "--preset", "llama-tiny", "--out", str(tmp_path / "p"), "--formats", "float32,int3", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "--formats: int3: unknown format 'int3'; formats are float32, bfloat16, int8, int4" in err
    assert "Traceback" not in err
