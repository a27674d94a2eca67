"""The model card: read once from a folder, the facts the serving path read before, and no re-read on re-plans."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from noodle.errors import ModelError
from noodle.models.card import ModelCard, read_card

from .test_registry import NAMES, _join

ROOT = Path(__file__).resolve().parents[2]


def _count_opens(monkeypatch: pytest.MonkeyPatch, folder: Path) -> Counter[str]:
    """Files of ``folder`` opened from now on (by name), through ``open`` and ``Path.read_*`` alike."""
    root, seen = os.path.realpath(folder), Counter[str]()
    real = io.open

    def counting(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)):
            path = os.path.realpath(os.fspath(file))
            if os.path.dirname(path) == root:
                seen[os.path.basename(path)] += 1
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting)
    monkeypatch.setattr(io, "open", counting)
    return seen


def test_cluster_serve_reads_config_once_through_start_up_and_a_replan(model_dir: Path, tokenizer: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from noodle.executors.grpc.coordinator import GrpcExecutor
    from noodle.serve.build import build_cluster_server

    class Opened(Exception):
        pass

    def no_workers(self: GrpcExecutor) -> GrpcExecutor:  # the executor is built (config, units, plan checked)
        raise Opened(self.vocab_size)

    opened = _count_opens(monkeypatch, model_dir)
    monkeypatch.setattr(GrpcExecutor, "__enter__", no_workers)
    served = build_cluster_server(model_dir, tokenizer, token="t", min_workers=1000)
    ctl = served.cluster
    try:
        for node in ("w1", "w2"):
            ctl.registry.join(_join(node, 1.0))
        records = ctl.registry.records()
        plan = ctl.solve(records)  # the re-plan the watcher makes when workers join, then the switch's executor
        with pytest.raises(Opened, match=str(ctl.card.vocab_size)):
            ctl._open(plan, records)
        ctl.solve(records)
    finally:
        ctl.close()
    assert {s.node for s in plan.stages} <= {"w1", "w2"} and plan.stages[-1].end == len(NAMES)
    assert opened["config.json"] == 1, dict(opened)


def test_the_card_holds_what_the_serving_path_read_from_transformers(model_dir: Path) -> None:
    from noodle.executors.slicing import read_config, unit_names_of
    from noodle.models.analytic import analytic_units
    from noodle.types import Workload

    card = read_card(model_dir)
    config = read_config(model_dir)
    assert card.folder == model_dir.resolve() and card.model_type == "gpt2" and card.architecture == "GPT2LMHeadModel"
    assert card.unit_names == tuple(unit_names_of(model_dir)) == NAMES and card.num_blocks == 4
    assert card.context_tokens == config.n_positions and card.vocab_size == config.vocab_size
    assert card.hidden_size == config.n_embd and card.eos_ids == (config.eos_token_id,)
    assert card.pad_id == config.eos_token_id  # no pad id: generate pads with eos
    mine, theirs = card.hf_config.to_dict(), config.to_dict()
    assert {k: v for k, v in mine.items() if k != "_name_or_path"} == \
        {k: v for k, v in theirs.items() if k != "_name_or_path"}  # fmt: skip
    units = analytic_units(card.config, Workload(prompt_tokens=8, max_new_tokens=8)).units
    assert card.kv_bytes_per_token == tuple(u.kv_bytes_per_token for u in units)
    assert card.kv_bytes_per_token[0] == card.kv_bytes_per_token[-1] == 0 < card.kv_bytes_per_token[1]
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    assert card.model_hash == h.hexdigest()[:16]


def test_weights_hash_is_computed_on_first_use_and_follows_the_bytes(model_dir: Path, tmp_path: Path) -> None:
    card = read_card(model_dir, cache_dir=tmp_path)
    assert "weights_sha256" not in card.__dict__
    files = sorted(model_dir.glob("*.safetensors"))
    want = hashlib.sha256(b"".join(f"{f.name}:{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode() for f in files))
    assert card.weights_sha256 == want.hexdigest() and len(list((tmp_path / "hashes").iterdir())) == len(files)


def test_a_replan_from_the_card_makes_the_problem_the_spec_file_makes(model_dir: Path) -> None:
    from noodle.serve.registry import ClusterRegistry, cluster_spec
    from noodle.spec import parse_spec

    reg = ClusterRegistry()
    for node in ("a", "b"):
        reg.join(_join(node, 1.0))
    card = read_card(model_dir)
    data = cluster_spec(reg.records(), card, concurrency=4)
    assert data == cluster_spec(reg.records(), model_dir, concurrency=4)
    spec = parse_spec(data, source="t")
    assert spec.to_problem(model_dir, hf_config=card.config) == spec.to_problem(model_dir)


@pytest.mark.parametrize(("content", "words"), [
    (None, "not a model folder (no config.json)"),
    (b"{nope", "not a readable JSON config"),
    (b"[1, 2]", "expected a JSON object of config keys, got list"),
])  # fmt: skip
def test_a_folder_that_is_no_model_is_one_model_error(tmp_path: Path, content: bytes | None, words: str) -> None:
    if content is not None:
        (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ModelError, match=words.replace("(", r"\(").replace(")", r"\)")):
        read_card(tmp_path)
    with pytest.raises(ModelError, match="no such model folder"):
        read_card(tmp_path / "missing")


def test_the_card_reads_a_known_family_without_torch_or_transformers(model_dir: Path) -> None:
    blocked = ("torch", "transformers", "safetensors", "grpc")
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            "from noodle.models.card import read_card\n"
            f"c = read_card({str(model_dir)!r})\n"
            "print((c.unit_names, c.kv_bytes_per_token, c.context_tokens, c.eos_ids))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    card = read_card(model_dir)
    assert out.stdout.strip() == str((card.unit_names, card.kv_bytes_per_token, card.context_tokens, card.eos_ids))


def test_a_card_is_frozen(model_dir: Path) -> None:
    card = read_card(model_dir)
    with pytest.raises(AttributeError):
        card.unit_names = ()  # type: ignore[misc]
    assert isinstance(card, ModelCard) and json.loads((model_dir / "config.json").read_text()) == card.config
