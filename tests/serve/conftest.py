"""A tiny GPT-2 with a tokenizer, its one-node plan, and one shared ``noodle serve`` subprocess."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from noodle.plandoc import PlanDoc, dump_plan

from .servers import CHAT_TEMPLATE, ServeProc, start_serve

API_KEY = "sk-noodle-test"


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from noodle.models import init_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return init_model("gpt2-tiny", tmp_path_factory.mktemp("serve-models") / "gpt2-tiny", seed=0)


@pytest.fixture(scope="session")
def plan_doc(model_dir: Path) -> PlanDoc:
    from noodle.serve.planning import plan_this_machine

    doc, _ = plan_this_machine(model_dir, concurrency=16)
    return doc


@pytest.fixture(scope="session")
def plan_file(plan_doc: PlanDoc, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve-plans") / "plan.json"
    path.write_text(dump_plan(plan_doc))
    return path


@pytest.fixture(scope="session")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve-templates") / "chat.jinja"
    path.write_text(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="session")
def server(model_dir: Path, plan_file: Path, template_file: Path) -> Iterator[ServeProc]:
    """``noodle serve`` with an API key and a chat template, shared by the tests that only send requests."""
    args = ["--model", str(model_dir), "--plan", str(plan_file), "--api-key", API_KEY,
            "--chat-template", str(template_file), "--concurrency", "16"]  # fmt: skip
    with start_serve(args) as sp:
        yield sp


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path, template_file: Path) -> Any:
    from noodle.cli.serve import load_tokenizer

    return load_tokenizer(model_dir, str(template_file))


@pytest.fixture(scope="session")
def reference(model_dir: Path, plan_doc: PlanDoc) -> Iterator[Callable[..., list[int]]]:
    """Tokens of the local executor's ``generate`` on one prompt (greedy, or seeded sampling), cut after EOS."""
    from noodle.executors import EXECUTORS, Sampling

    with EXECUTORS.get("local")(plan_doc, model_dir) as ex:
        eos = ex.eos_token_id

        def run(ids: list[int], n: int, sampling: Sampling = Sampling()) -> list[int]:
            toks = ex.generate([ids], max_new_tokens=n, sampling=sampling).tokens[0]
            return toks[: toks.index(eos) + 1] if eos in toks else toks

        yield run
