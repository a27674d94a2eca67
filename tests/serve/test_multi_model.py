"""``noodle serve`` with two models: routing by ``model``, each model's own tokens, per-model metrics, one joint plan."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from noodle.cli.serve_models import check_several, parse_models
from noodle.errors import SpecError
from noodle.jointdoc import dump_joint_plan, joint_document, load_joint_plan, model_plans
from noodle.plandoc import dump_plan
from noodle.solvers.joint import solve_joint
from noodle.spec import load_joint_spec

from .servers import ServeProc, start_serve

MAX_TOKENS = 10
PROMPTS = [[5, 17, 99, 250, 3], [40, 41, 42], [300, 7, 7, 7, 8, 120], [11]]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from noodle.models import init_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return init_model("llama-tiny", tmp_path_factory.mktemp("multi-models") / "llama-tiny", seed=3)


@pytest.fixture(scope="module")
def joint_spec(model_dir: Path, llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny models (GPT-2 and Llama) on two unequal nodes, chat weighted twice."""
    spec = {
        "name": "tiny-pair",
        "models": [{"name": "gpt", "hf_config": str(model_dir / "config.json")},
                   {"name": "chat", "hf_config": str(llama_dir / "config.json"), "weight": 2}],
        "workload": {"prompt_tokens": 64, "max_new_tokens": 32, "batch_size": 1},
        "cluster": {"nodes": [{"id": "fast", "device": "cpu", "memory_gb": 1, "compute_score": 2},
                              {"id": "slow", "device": "cpu", "memory_gb": 1, "compute_score": 1}]},
        "solver": {"name": "auto", "time_limit_s": 10},
    }  # fmt: skip
    path = tmp_path_factory.mktemp("multi-specs") / "pair.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def pair(model_dir: Path, llama_dir: Path, joint_spec: Path) -> Iterator[ServeProc]:
    """Both models served at once from the joint spec solved at start-up."""
    args = ["--model", f"gpt={model_dir}", "--model", f"chat={llama_dir}", "--spec", str(joint_spec),
            "--concurrency", "4"]  # fmt: skip
    with start_serve(args) as sp:
        yield sp


@functools.cache
def _hf_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _hf_greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    """The model's own transformers ``generate()``, greedy, its new tokens (up to and with EOS)."""
    model = _hf_model(folder)
    eos = model.config.eos_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=eos)  # fmt: skip
    return [int(t) for t in out[0, len(ids):]]


def _client(sp: ServeProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sp.base}/v1", api_key="none", max_retries=0, timeout=120)


def test_two_models_answer_concurrently_each_with_its_own_tokens(pair: ServeProc, model_dir: Path,
                                                                llama_dir: Path) -> None:  # fmt: skip
    from transformers import AutoTokenizer

    folders = {"gpt": model_dir, "chat": llama_dir}
    jobs = [(name, ids) for ids in PROMPTS for name in folders]
    client = _client(pair)

    def ask(job: tuple[str, list[int]]) -> Any:
        return client.completions.create(model=job[0], prompt=job[1], max_tokens=MAX_TOKENS, temperature=0)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:  # every request in flight at once, both models
        answers = list(pool.map(ask, jobs))
    generated = {"gpt": 0, "chat": 0}
    for (name, ids), res in zip(jobs, answers):
        want = _hf_greedy(folders[name], ids, MAX_TOKENS)
        tok = AutoTokenizer.from_pretrained(folders[name])
        assert res.model == name
        assert res.choices[0].text == tok.decode(want, skip_special_tokens=True), (name, ids)
        assert res.usage.completion_tokens == len(want)
        generated[name] += len(want)
    # the two models differ (else routing could not be told apart): their greedy texts do
    assert _hf_greedy(model_dir, PROMPTS[0], MAX_TOKENS) != _hf_greedy(llama_dir, PROMPTS[0], MAX_TOKENS)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{pair.base}/metrics", timeout=30).text)}
    tokens = {s.labels["model_name"]: s.value for s in families["vllm:generation_tokens"].samples
              if s.name.endswith("_total")}  # fmt: skip
    assert tokens == generated
    ready = {s.labels["model_name"]: s.value for s in families["noodle_ready"].samples}
    assert ready == {"gpt": 1.0, "chat": 1.0}
    predicted = {s.labels["model_name"]: s.value for s in families["noodle_plan_predicted_tokens_per_second"].samples}
    assert predicted["chat"] == pytest.approx(2 * predicted["gpt"])  # the joint plan's rates: weight 2 vs 1
    for fam in families.values():  # every series but the server's HTTP counts names its model
        if not fam.name.startswith("noodle_requests"):  # (its _created samples parse as a family of their own)
            assert all("model_name" in s.labels for s in fam.samples), fam.name


def test_models_lists_both_and_an_unknown_model_is_a_404_naming_them(pair: ServeProc) -> None:
    client = _client(pair)
    assert [m.id for m in client.models.list().data] == ["gpt", "chat"]
    assert client.models.retrieve("chat").id == "chat"
    for call in (lambda: client.completions.create(model="gpt-4", prompt="x", max_tokens=1),
                 lambda: client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}]),
                 lambda: client.models.retrieve("gpt-4")):  # fmt: skip
        with pytest.raises(openai.NotFoundError) as err:
            call()
        body = err.value.body
        assert isinstance(body, dict) and body["code"] == "model_not_found" and body["param"] == "model"
        assert body["message"] == "model: 'gpt-4' is not served here; this server serves 'gpt', 'chat'"


def test_this_machine_plans_each_model_and_sigterm_closes_both(model_dir: Path, llama_dir: Path) -> None:
    with start_serve(["--model", str(model_dir), "--model", f"chat={llama_dir}"]) as sp:
        client = _client(sp)
        assert [m.id for m in client.models.list().data] == ["gpt2-tiny", "chat"]
        for name in ("gpt2-tiny", "chat"):
            assert client.completions.create(model=name, prompt=[5, 6], max_tokens=3, temperature=0).model == name
        code = sp.stop()
        log = sp.log()
    assert code == 0, log
    assert "each model planned alone" in log and log.count("pipeline and executor closed") == 2, log


def test_status_page_per_model(pair: ServeProc) -> None:
    chat = httpx.get(f"{pair.base}/noodle/status", params={"model": "chat"}, timeout=30).json()
    assert chat["model"] == "chat" and chat["models"] == ["gpt", "chat"] and chat["plan"]["name"] == "tiny-pair/chat"
    first = httpx.get(f"{pair.base}/noodle/status", timeout=30).json()
    assert first["model"] == "gpt" and first["plan"]["name"] == "tiny-pair/gpt"
    assert httpx.get(f"{pair.base}/noodle/status", params={"model": "x"}, timeout=30).status_code == 404


def test_joint_plan_file_splits_into_each_models_pipeline(joint_spec: Path, model_dir: Path, llama_dir: Path,
                                                          tmp_path: Path) -> None:  # fmt: skip
    spec, problem = load_joint_spec(joint_spec)
    result = solve_joint(problem, solver="heuristic", time_limit_s=5)
    doc = joint_document(problem, result)
    path = tmp_path / "joint.json"
    path.write_text(dump_joint_plan(doc))
    plans = model_plans(load_joint_plan(path))
    assert list(plans) == ["gpt", "chat"]
    for name, m in zip(plans, doc.models):
        p = plans[name]
        assert [(s.node, s.start, s.end) for s in p.stages] == [(s.node, s.start, s.end) for s in doc.stages
                                                                if s.model == name]  # fmt: skip
        assert p.predicted.pipeline_tokens_per_s == m.tokens_per_s and p.units == m.units
    bad = doc.model_copy(update={"stages": [s.model_copy(update={"node": "gone"}) for s in doc.stages]})
    with pytest.raises(SpecError, match="node 'gone' is not in the plan's nodes"):
        model_plans(bad)
    one = tmp_path / "one.json"
    one.write_text(dump_plan(next(iter(plans.values()))))
    with pytest.raises(SpecError, match="kind: not a joint plan"):
        load_joint_plan(one)


def test_model_flags_are_checked_at_the_edge(model_dir: Path, tmp_path: Path) -> None:
    assert parse_models([str(model_dir)]) == [(None, model_dir)]
    assert parse_models([f"a={model_dir}", f"b={model_dir}"]) == [("a", model_dir), ("b", model_dir)]
    with pytest.raises(SpecError, match="--model: '=x': give NAME=FOLDER"):
        parse_models(["=x"])
    flags: dict[str, Any] = {"served_model_name": None, "backend": "local", "cluster": False, "emulate": False,
                             "workers": None}  # fmt: skip
    assert check_several([(None, model_dir), ("b", model_dir)], **flags) == [("gpt2-tiny", model_dir), ("b", model_dir)]
    cases = [
        ([(None, model_dir), (None, model_dir)], {}, "--model: two models are named 'gpt2-tiny'"),
        ([("a", model_dir), ("b", tmp_path / "nope")], {}, f"--model: b={tmp_path / 'nope'}: no such model folder"),
        ([("a", model_dir), ("b", model_dir)], {"served_model_name": "x"}, "--served-model-name: names one model"),
        ([("a", model_dir), ("b", model_dir)], {"cluster": True}, "--cluster: serves one model"),
        ([("a", model_dir), ("b", model_dir)], {"backend": "grpc"}, "--backend: several models run on the local"),
        ([("a", model_dir), ("b", model_dir)], {"emulate": True}, "--emulate: one model only"),
    ]
    for models, extra, message in cases:
        with pytest.raises(SpecError) as err:
            check_several(models, **{**flags, **extra})
        assert str(err.value).startswith(message), str(err.value)


def test_a_joint_plan_of_other_names_is_one_line_and_exit_2(model_dir: Path, llama_dir: Path, joint_spec: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "noodle.cli.main", "serve", "--model", f"gpt={model_dir}", "--model",
                          f"other={llama_dir}", "--spec", str(joint_spec), "--port", "0"], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--spec: it places models gpt, chat; --model names gpt, other" in run.stderr, run.stderr
