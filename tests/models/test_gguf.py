"""``noodle model import``: a missing, corrupt, truncated or unreadable-architecture GGUF is one clear line."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from noodle.cli.main import main
from noodle.errors import ModelError, SpecError
from noodle.models.gguf import gguf_info, import_gguf


def _write_gguf(path: Path, arch: str, rows: int = 8) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_tensor("token_embd.weight", np.arange(rows * 4, dtype=np.float32).reshape(rows, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_header_is_read_without_loading_weights(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", "llama")
    info = gguf_info(path)
    assert (info.architecture, info.name, info.tensors, info.size) == ("llama", "tiny", 1, path.stat().st_size)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "no such GGUF file"),
        (lambda p: (p.write_bytes(b"PK\x03\x04 a zip, not gguf"), p)[1], "not a GGUF file (starts with b'PK\\x03\\x04'"),
        (lambda p: (p.write_bytes(b""), p)[1], "not a GGUF file (starts with b''"),
    ],
    ids=["missing", "not-gguf", "empty"],
)
def test_missing_or_foreign_files_are_refused(tmp_path, make, message):
    path = make(tmp_path / "x.gguf")
    with pytest.raises(ModelError) as info:
        gguf_info(path)
    assert f"x.gguf: {message}" in str(info.value)


@pytest.mark.parametrize("keep", [100, -40])
def test_truncated_file_is_refused(tmp_path, keep):
    data = _write_gguf(tmp_path / "full.gguf", "llama", rows=64).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(ModelError, match="cut.gguf: truncated"):
        gguf_info(cut)


def test_unreadable_architecture_names_the_ones_transformers_reads(tmp_path):
    path = _write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(ModelError, match="architecture 'rwkv6' cannot be read from GGUF .* it reads .*llama"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_dtype_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="--dtype: 'int8' is not a dtype; use one of float32, bfloat16, float16"):
        import_gguf(tmp_path / "x.gguf", tmp_path / "out", dtype="int8")


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["nope.gguf"], "no such GGUF file"), (["bad.gguf"], "not a GGUF file"), (["ok.gguf", "--dtype", "int4"], "--dtype")],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.gguf").write_text("hello")
    _write_gguf(tmp_path / "ok.gguf", "llama")
    rc = main(["model", "import", *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("noodle: error: ") and needle in err, err


def test_dequantization_reports_progress_through_noodle(caplog, monkeypatch):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from noodle.models import gguf as module

    monkeypatch.setattr("noodle.progress.sys.stderr", io.StringIO())  # not a terminal: log lines
    real = module.progress_bar
    monkeypatch.setattr(module, "progress_bar", lambda *a, **k: real(*a, **{**k, "every_s": 0.0}))
    with caplog.at_level("INFO", logger="noodle.progress"), module._dequantize_progress(True, "dequantizing x.gguf"):
        items = list(gguf_utils.tqdm(["a", "b", "c"], desc="Converting and de-quantizing GGUF tensors..."))
    assert items == ["a", "b", "c"]
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["dequantizing x.gguf: 1/3", "dequantizing x.gguf: 2/3"]
