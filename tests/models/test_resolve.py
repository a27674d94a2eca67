"""``--model`` resolution: folders, Hugging Face cache snapshots and cached repo ids, offline."""

from __future__ import annotations

import pytest

from noodle.cli.main import main
from noodle.errors import ModelError
from noodle.models import init_model
from noodle.models.resolve import resolve_model


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """A Hugging Face cache laid out as huggingface_hub writes it, holding ``org/tiny`` at commit abc123."""
    root = tmp_path_factory.mktemp("hub")
    repo = root / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    init_model("llama-tiny", snap, seed=0, tokenizer=False)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    return root


def test_plain_folder_is_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(tmp_path) == tmp_path


def test_repo_id_in_the_cache(hf_cache):
    assert resolve_model("org/tiny", cache_dir=hf_cache) == hf_cache / "models--org--tiny" / "snapshots" / "abc123"


def test_repo_cache_folder_and_snapshot_folder(hf_cache):
    snap = hf_cache / "models--org--tiny" / "snapshots" / "abc123"
    assert resolve_model(hf_cache / "models--org--tiny") == snap
    assert resolve_model(snap) == snap


def test_repo_id_not_in_the_cache_is_one_clear_error(hf_cache):
    with pytest.raises(ModelError, match="org/absent: no such folder, and no repo 'org/absent' in the local Hugging Face cache"):
        resolve_model("org/absent", cache_dir=hf_cache)


def test_missing_plain_path_is_left_to_the_loaders(tmp_path):
    assert resolve_model(tmp_path / "nope") == tmp_path / "nope"


def test_cli_profile_accepts_a_cached_repo_id(hf_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hf_cache))
    out = tmp_path / "prof"
    rc = main(["profile", "--model", "org/tiny", "--out", str(out), "--iterations", "1",
               "--warmup", "0", "--module-iterations", "0", "--no-dashboard", "--prompt-tokens", "8", "--decode-tokens", "2"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert (out / "metrics.jsonl").is_file()
