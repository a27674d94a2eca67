"""``noodle exec`` end to end through ``noodle.cli.main.main``: output, and bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from noodle.cli.main import main
from noodle.plandoc import LinkDoc, dump_plan
from noodle.types import unit_names

from .conformance import PROMPT_SETS, make_plan, plan_for, reference


def _write(tmp_path: Path, doc, name: str = "plan.json") -> str:
    path = tmp_path / name
    path.write_text(dump_plan(doc, "yaml" if name.endswith(".yaml") else "json"))
    return str(path)


def _one_line_error(capsys: pytest.CaptureFixture[str], rc: int, want_rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == want_rc, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("noodle: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_json_output_is_tokens_and_report_only(tiny_models, tmp_path, capsys):
    model = tiny_models["llama"]
    plan = _write(tmp_path, plan_for(model, [0, 2, 4, 6]))
    prompt = PROMPT_SETS["batch1"][0]
    rc = main(["exec", plan, "--model", str(model), "--prompt-ids", ",".join(map(str, prompt)),
               "--max-new-tokens", "5", "--format", "json"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out)
    assert set(data) == {"tokens", "report"}
    assert data["tokens"] == reference(model, [prompt], 5)[0]
    rep = data["report"]
    assert rep["backend"] == "local" and len(rep["stages"]) == 3
    assert {"prefill_ms", "decode_ms_p50", "decode_ms_p95", "bytes_out", "predicted_latency_ms",
            "latency_error_pct"} <= set(rep["stages"][0])  # fmt: skip
    assert rep["tokens_per_s"] > 0


@pytest.mark.parametrize("flag", ["--batch", "--batch-ids"])
def test_table_output_with_batch_file_and_yaml_plan(tiny_models, tmp_path, capsys, flag):
    model = tiny_models["gpt2"]
    plan = _write(tmp_path, plan_for(model, [0, 1, 5, 6]), "plan.yaml")
    prompts = PROMPT_SETS["padded"]
    batch = tmp_path / "prompts.txt"
    batch.write_text("\n".join(",".join(map(str, p)) for p in prompts) + "\n")
    rc = main(["exec", plan, "--model", str(model), flag, str(batch), "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    want = reference(model, prompts, 4)[0]
    for i, toks in enumerate(want):
        assert f"[{i}] tokens: {toks}" in out
    assert "run report (local)" in out and "decode tokens/s" in out


def test_text_prompt_with_tokenizer(tiny_models, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import shutil

    model = tmp_path / "with-tok"
    shutil.copytree(tiny_models["llama"], model)
    vocab = {f"w{i}": i for i in range(512)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(model)
    plan = _write(tmp_path, plan_for(model, [0, 3, 6]))
    rc = main(["exec", plan, "--model", str(model), "--prompt", "w5 w17 w99 w42", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    toks = reference(model, [[5, 17, 99, 42]], 3)[0][0]
    assert f"tokens: {toks}" in out
    assert "text: '" + " ".join(f"w{t}" for t in toks) in out


@pytest.mark.parametrize(("flag", "want"), [([], [1, 5, 17, 2]), (["--chat"], [1, 5, 17, 2]), (["--no-chat"], [5, 17])])
def test_chat_template_applies_by_default(tiny_models, tmp_path, capsys, flag, want):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tmp_path / "chat-tok"
    shutil.copytree(tiny_models["llama"], model)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    fast.chat_template = "{% for m in messages %}w1 {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} w2{% endif %}"
    fast.save_pretrained(model)
    plan = _write(tmp_path, plan_for(model, [0, 3, 6]))
    rc = main(["exec", plan, "--model", str(model), "--prompt", "w5 w17", *flag, "-n", "3", "-f", "json"])
    out = capsys.readouterr().out
    assert rc == 0
    assert json.loads(out)["tokens"] == reference(model, [want], 3)[0]
    assert reference(model, [want], 3)[0] != reference(model, [[1, 5, 17, 2] if flag == ["--no-chat"] else [5, 17]], 3)[0]


def test_emulate_says_so(tiny_models, tmp_path, capsys):
    model = tiny_models["gpt2"]
    links = [LinkDoc(a="node0", b="node1", bandwidth_gbps=1.0, latency_ms=5.0)]
    plan = _write(tmp_path, plan_for(model, [0, 3, 6], compute_scores={"node1": 0.5}, links=links))
    rc = main(["exec", plan, "--model", str(model), "--prompt-ids", "1,2,3", "-n", "2", "--emulate", "-f", "json"])
    cap = capsys.readouterr()
    assert rc == 0
    assert "emulating" in cap.err
    assert json.loads(cap.out)["report"]["emulated"] is True


def test_plan_for_another_model_is_refused(tiny_models, tmp_path, capsys):
    model = tiny_models["llama"]
    other = make_plan(unit_names(6), [("a", 0, 4), ("b", 4, 8)])  # 6 blocks; the model has 4
    rc = main(["exec", _write(tmp_path, other), "--model", str(model), "--prompt-ids", "1,2"])
    _one_line_error(capsys, rc, 2, "units", "8 units", "6", "block.4")


def test_missing_model_folder(tiny_models, tmp_path, capsys):
    plan = _write(tmp_path, plan_for(tiny_models["llama"], [0, 6]))
    rc = main(["exec", plan, "--model", str(tmp_path / "nope"), "--prompt-ids", "1,2"])
    _one_line_error(capsys, rc, 2, "no such model folder")


def test_prompt_longer_than_planned(tiny_models, tmp_path, capsys):
    model = tiny_models["llama"]
    plan = _write(tmp_path, plan_for(model, [0, 3, 6], prompt_tokens=4))
    rc = main(["exec", plan, "--model", str(model), "--prompt-ids", "1,2,3,4,5,6"])
    _one_line_error(capsys, rc, 2, "6 tokens", "at most 4", "prompt_tokens")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--prompt", "hello"], ["--prompt", "no tokenizer", "--prompt-ids"]),
        (["--prompt-ids", "1,x,3"], ["--prompt-ids", "1,x,3"]),
        (["--prompt-ids", "1,9999"], ["9999", "[0, 512)"]),
        ([], ["exactly one of"]),
        (["--prompt-ids", "1", "--backend", "warp"], ["'warp'", "local"]),
        (["--prompt-ids", "1", "--top-p", "0"], ["--top-p", "(0, 1]"]),
        (["--prompt-ids", "1", "--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
        (["--prompt-ids", "1", "--format", "xml"], ["--format", "table, json"]),
    ],
    ids=["no-tokenizer", "bad-ids", "id-out-of-vocab", "no-prompt", "unknown-backend", "top-p", "zero-tokens", "format"],
)
def test_bad_flags(tiny_models, tmp_path, capsys, args, needles):
    model = tiny_models["llama"]
    plan = _write(tmp_path, plan_for(model, [0, 6]))
    rc = main(["exec", plan, "--model", str(model), *args])
    _one_line_error(capsys, rc, 2, *needles)


def test_missing_plan_file(tiny_models, tmp_path, capsys):
    rc = main(["exec", str(tmp_path / "none.json"), "--model", str(tiny_models["llama"]), "--prompt-ids", "1"])
    _one_line_error(capsys, rc, 2, "none.json", "cannot read plan")


@pytest.mark.parametrize("batching", ["exact", "groups", "continuous"])
def test_concurrency_runs_each_prompt_alone_and_reports_the_plans_rate(tiny_models, tmp_path, capsys, batching):
    model = tiny_models["llama"]
    plan = _write(tmp_path, plan_for(model, [0, 2, 4, 6], batch_size=1))
    prompts = [[5, 17, 99, 42, 7, 300, 12, 8, 41], [77, 3, 250], [9, 10, 11, 12, 13, 14], [4], [8, 8, 8, 8, 8]]
    batch = tmp_path / "ids.txt"
    batch.write_text("\n".join(",".join(map(str, p)) for p in prompts) + "\n")
    rc = main(["exec", plan, "--model", str(model), "--batch-ids", str(batch), "-n", "6", "--concurrency", "3",
               "--prefill-chunk", "4", "--format", "json", "--batching", batching])  # fmt: skip
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["report"]["batching"] == batching
    for p, got in zip(prompts, data["tokens"]):
        want = reference(model, [p], 6)[0][0]
        assert got == (want[: want.index(2) + 1] if 2 in want else want)
    rep = data["report"]
    assert rep["concurrency"] == 3 and rep["requests"] == 5 and rep["prefill_chunk"] == 4
    # hand-made plan: 3 stages of 1 ms -> one trip 3 ms, bottleneck 1 ms: 3 groups reach 1000 tokens/s;
    # the plan is priced in groups (no workload.streams), so a batched run has no prediction (rather than a wrong one)
    if batching == "continuous":
        assert rep["predicted_tokens_per_s"] is None
    else:
        assert rep["predicted_tokens_per_s"] == pytest.approx(1000.0)
    assert rep["tokens_per_s"] > 0 and rep["ttft_ms_p50"] > 0 and rep["itl_ms_p50"] > 0
    assert all(0 <= s["busy_fraction"] <= 1 for s in rep["stages"])


@pytest.mark.parametrize(
    "flags,needle",
    [(["--concurrency", "0"], "--concurrency"), (["--concurrency", "2", "--micro-batch", "0"], "--micro-batch"),
     (["--concurrency", "2", "--prefill-chunk", "-3"], "--prefill-chunk"), (["--prefill-chunk", "8"], "need --concurrency"),
     (["--concurrency", "2", "--batching", "paged"], "--batching: must be one of auto, continuous, exact, groups"),
     (["--concurrency", "2", "--max-batch-tokens", "0"], "--max-batch-tokens")],
)  # fmt: skip
def test_bad_concurrency_flags_are_one_line(tiny_models, tmp_path, capsys, flags, needle):
    model = tiny_models["llama"]
    plan = _write(tmp_path, plan_for(model, [0, 3, 6]))
    rc = main(["exec", plan, "--model", str(model), "--prompt-ids", "1,2,3", *flags])
    _one_line_error(capsys, rc, 2, needle)
