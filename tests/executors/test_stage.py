"""A stage alone: which weights it loads, its wire messages, its logits, its errors."""

from __future__ import annotations

import pytest
import torch

from noodle.errors import ExecutorError, ModelError
from noodle.executors import StageInput, StageOutput, StageRunner, codec
from noodle.executors.generation import left_pad
from noodle.models import load_model

from .conformance import PROMPT_SETS
from .readrecorder import record_reads


def test_middle_stage_reads_and_holds_only_its_blocks(tiny_models, monkeypatch):
    model = tiny_models["llama"]
    reads = record_reads(monkeypatch)
    stage = StageRunner(model, 2, 4)
    assert stage.layers == [1, 2] and not stage.is_first and not stage.is_last
    assert reads and all(r.startswith(("model.layers.1.", "model.layers.2.")) for r in reads)
    full = load_model(model)
    want = sum(p.numel() * p.element_size() for n, p in full.named_parameters() if n.startswith(("model.layers.1.", "model.layers.2.")))
    rotary = sum(b.numel() * b.element_size() for b in full.model.rotary_emb.buffers())
    assert stage.param_bytes() == want + rotary
    for mod in stage.slice.modules():
        assert not any(t.is_meta for t in [*mod.parameters(), *mod.buffers()])


def test_tied_head_without_embedding_loads_its_own_copy(tiny_models, monkeypatch):
    model = tiny_models["gpt2"]
    full = load_model(model)
    reads = record_reads(monkeypatch)
    last = StageRunner(model, 5, 6)
    assert sorted(reads) == ["transformer.ln_f.bias", "transformer.ln_f.weight", "transformer.wte.weight"]
    torch.testing.assert_close(last.slice.head.weight, full.transformer.wte.weight)
    whole = StageRunner(model, 0, 6)
    token_embed = dict(whole.slice.embed)["tokens"]
    assert whole.slice.head.weight is token_embed.weight  # tied: one tensor, counted once
    assert whole.param_bytes() == sum(p.numel() * p.element_size() for p in full.parameters())


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral"])
def test_all_logits_of_a_padded_prefill_match_the_full_model(tiny_models, family):
    model = tiny_models[family]
    full = load_model(model)
    ids, mask = left_pad(PROMPT_SETS["padded"], 0)
    assert mask is not None
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.inference_mode():
        want = full(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    stages = [StageRunner(model, a, b) for a, b in [(0, 2), (2, 3), (3, 6)]]
    x = StageInput("s", ids, mask, prefill=True, all_logits=True)
    for st in stages:
        out = st.step(x)
        x = out.next_input(prefill=True, all_logits=True)
    assert out.is_logits and out.data.shape == want.shape
    real = mask.bool()
    torch.testing.assert_close(out.data[real], want[real], atol=1e-5, rtol=1e-5)


def _through_codec(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else codec.decode(*codec.encode(t), field="t")


def test_messages_survive_the_codec(tiny_models):
    model = tiny_models["qwen2"]
    stages = [StageRunner(model, a, b) for a, b in [(0, 3), (3, 6)]]
    ids, mask = left_pad(PROMPT_SETS["padded"], 0)

    def run(wire: bool) -> list[torch.Tensor]:
        logits = []
        msg = StageInput(f"w{wire}", ids, mask, prefill=True)
        for _ in range(3):
            x = msg
            for st in stages:
                if wire:
                    x = StageInput(x.session, _through_codec(x.data), _through_codec(x.attention_mask), x.prefill)
                out = st.step(x)
                if wire:
                    out = StageOutput(out.session, _through_codec(out.data), _through_codec(out.attention_mask),
                                      out.is_logits)  # fmt: skip
                x = out.next_input(prefill=msg.prefill)
            logits.append(out.data[:, -1])
            msg = StageInput(msg.session, out.data[:, -1].argmax(-1, keepdim=True), torch.ones(3, 1, dtype=torch.long))
        return logits

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_step_errors_are_clear(tiny_models):
    model = tiny_models["llama"]
    first, middle = StageRunner(model, 0, 2), StageRunner(model, 2, 4)
    with pytest.raises(ExecutorError, match="unknown session 'nope'"):
        first.step(StageInput("nope", torch.tensor([[1, 2]])))
    with pytest.raises(ExecutorError, match=r"expects hidden states .* shape \(1, 2\)"):
        middle.step(StageInput("s", torch.tensor([[1, 2]]), prefill=True))
    with pytest.raises(ExecutorError, match="attention_mask shape"):
        first.step(StageInput("s", torch.tensor([[1, 2]]), torch.ones(1, 3), prefill=True))
    first.step(StageInput("s", torch.tensor([[1, 2]]), prefill=True))
    assert first.sessions() == ["s"] and first.cache_bytes("s") > 0
    first.end_session("s")
    assert first.sessions() == [] and first.cache_bytes("s") == 0


def test_folder_without_safetensors(tiny_models, tmp_path):
    import shutil

    shutil.copy(tiny_models["llama"] / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        StageRunner(tmp_path, 0, 2)


def test_sharded_folder_loads_through_the_index(tiny_models, tmp_path):
    full = load_model(tiny_models["llama"])
    full.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = torch.tensor([PROMPT_SETS["batch1"][0]])
    x = StageInput("s", ids, prefill=True)
    for a, b in [(0, 3), (3, 6)]:
        out = StageRunner(tmp_path, a, b).step(x)
        x = out.next_input(prefill=True)
    with torch.inference_mode():
        want = full(input_ids=ids).logits[:, -1:]
    torch.testing.assert_close(out.data, want)
