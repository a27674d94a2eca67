"""Executor conformance: any executor must produce what the unsplit model produces.

Later executors reuse this module::

    from .conformance import CUTS, PROMPT_SETS, check_executor, make_plan

    @pytest.mark.parametrize("cuts", CUTS.values(), ids=CUTS.keys())
    def test_mine(tiny_models, cuts):
        check_executor(MyExecutor, tiny_models["llama"], cuts, PROMPT_SETS["padded"])

``check_executor`` asserts greedy tokens identical to ``model.generate(do_sample=False)``
and every step's last-position logits allclose to ``generate``'s raw logits.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from noodle.executors.generation import token_ids_of
from noodle.executors.slicing import read_config, unit_names_of
from noodle.plandoc import LinkDoc, NodeDoc, PlanDoc, Predicted, SolverInfo, StageDoc

__all__ = ["CUTS", "PROMPT_SETS", "FAMILIES", "make_plan", "plan_for", "reference", "check_executor", "random_requests", "alone",
           "check_greedy_constrained"]

# Unit boundaries for a 4-block model (units: embed, block.0..3, lm_head = 6 units).
CUTS: dict[str, list[int]] = {
    "1-stage": [0, 6],
    "embed|rest": [0, 1, 6],
    "rest|head": [0, 5, 6],
    "3-stages": [0, 2, 4, 6],
    "4-stages": [0, 1, 3, 5, 6],
}

PROMPT_SETS: dict[str, list[list[int]]] = {
    "batch1": [[5, 17, 99, 42, 7, 300, 12]],
    "padded": [[5, 17, 99, 42, 7, 300, 12, 8, 41], [77, 3, 250], [9, 10, 11, 12, 13, 14]],
}

TINY = dict(
    num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
# name -> init_model source. Mistral uses a sliding window shorter than the prompts.
FAMILIES: dict[str, Any] = {
    "gpt2": "gpt2-tiny",
    "llama": "llama-tiny",
    "qwen2": {"model_type": "qwen2", **TINY},
    "mistral": {"model_type": "mistral", "sliding_window": 6, **TINY},
}


def make_plan(
    units: Sequence[str],
    ranges: Sequence[tuple[str, int, int]],
    *,
    prompt_tokens: int = 64,
    max_new_tokens: int = 32,
    batch_size: int = 4,
    compute_scores: dict[str, float] | None = None,
    links: Sequence[LinkDoc] = (),
    compute_ms: float = 1.0,
) -> PlanDoc:
    """A PlanDoc for ``(node, start, end)`` ranges, made by hand (no solver)."""
    scores = compute_scores or {}
    nodes = list(dict.fromkeys(node for node, _, _ in ranges))
    stages = [
        StageDoc(
            stage_id=i, node=node, device="cpu", layers=list(units[a:b]), start=a, end=b,
            compute_ms=compute_ms, hop_ms=0.0, expected_latency_ms=compute_ms,
            memory_required_mb=1.0, memory_available_mb=1024.0, rationale="hand-made test plan",
        )  # fmt: skip
        for i, (node, a, b) in enumerate(ranges)
    ]
    total = compute_ms * len(stages)
    return PlanDoc(
        name="test-plan",
        objective="latency",
        objective_ms=total,
        cost_model="none",
        solver=SolverInfo(name="hand", status="baseline", solve_time_s=0.0),
        predicted=Predicted(token_latency_ms=total, bottleneck_ms=compute_ms, tokens_per_s=1e3 / total),
        stages=stages,
        units=list(units),
        workload={"prompt_tokens": prompt_tokens, "max_new_tokens": max_new_tokens, "batch_size": batch_size},
        nodes=[NodeDoc(id=n, device="cpu", memory_gb=1.0, compute_score=scores.get(n, 1.0)) for n in nodes],
        links=list(links),
    )


def plan_for(model_dir: str | Path, cuts: Sequence[int], **kw: Any) -> PlanDoc:
    """A plan cutting the model in ``model_dir`` at unit boundaries ``cuts`` (one node per stage)."""
    units = unit_names_of(model_dir)
    ranges = [(f"node{i}", a, b) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    return make_plan(units, ranges, **kw)


@lru_cache(maxsize=64)
def _reference(model_dir: str, prompts: tuple[tuple[int, ...], ...], max_new_tokens: int) -> tuple[Any, Any]:
    from noodle.executors.generation import left_pad
    from noodle.models import load_model

    eos, pad = token_ids_of(read_config(model_dir))
    model = load_model(model_dir)
    ids, mask = left_pad([list(p) for p in prompts], pad)
    kwargs: dict[str, Any] = {} if mask is None else {"attention_mask": mask}
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, **kwargs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
            eos_token_id=eos, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    return out.sequences[:, ids.shape[1] :].tolist(), tuple(out.logits)


def reference(model_dir: str | Path, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[Any, Any]:
    """``(tokens, per-step logits)`` of the unsplit model's greedy ``generate`` (cached)."""
    return _reference(str(model_dir), tuple(tuple(p) for p in prompts), max_new_tokens)


def check_executor(
    factory: Callable[..., Any],
    model_dir: str | Path,
    cuts: Sequence[int] | PlanDoc,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 6,
    atol: float = 1e-5,
) -> None:
    """Run ``factory(plan, model_dir)`` on a plan cut at ``cuts`` (or a given plan) and compare with ``generate``."""
    plan = cuts if isinstance(cuts, PlanDoc) else plan_for(model_dir, cuts)
    want_tokens, want_logits = reference(model_dir, prompts, max_new_tokens)
    with factory(plan, model_dir) as ex:
        result = ex.generate(prompts, max_new_tokens=max_new_tokens, keep_logits=True)
    where = [(st.start, st.end) for st in plan.stages]
    assert result.tokens == want_tokens, f"stages {where}: tokens differ from generate()"
    assert len(result.logits) == len(want_logits)
    for step, (got, want) in enumerate(zip(result.logits, want_logits)):
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-5, msg=lambda m: f"step {step}: {m}")
    assert len(result.report.stages) == len(plan.stages)


def random_requests(n: int, seed: int, *, prompt: tuple[int, int] = (1, 20), new: tuple[int, int] = (2, 10)) -> list[tuple[list[int], int]]:
    """``n`` seeded ``(prompt ids, max_new_tokens)`` pairs; lengths drawn from the half-open ``prompt`` and ``new`` ranges."""
    rng = random.Random(seed)
    return [([rng.randrange(3, 500) for _ in range(rng.randrange(*prompt))], rng.randrange(*new)) for _ in range(n)]


def alone(model_dir: str | Path, prompt: Sequence[int], new: int) -> list[int]:
    """``generate()``'s greedy tokens for ``prompt`` alone, cut after the first EOS (as the pipeline returns them)."""
    want = reference(model_dir, [prompt], new)[0][0]
    eos = token_ids_of(read_config(model_dir))[0]
    stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    cut = next((i for i, t in enumerate(want) if t in stops), None)
    return want if cut is None else want[: cut + 1]



class _Banned:
    """A grammar stand-in: never the tokens in ``banned`` (for executors that may send argmax ids only)."""

    def __init__(self, banned: set[int]) -> None:
        self.banned = sorted(banned)

    def start(self) -> _Banned:
        return self

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        out = logits.detach().float().clone()
        out[:, self.banned] = float("-inf")
        return out

    def accept(self, token: int) -> None:
        assert token not in self.banned


def check_greedy_constrained(ex: Any, model_dir: str | Path, prompt: Sequence[int], new: int = 5) -> None:
    """Greedy decoding with a constraint that bans every token the unconstrained greedy run picks: ``ex`` must give
    the local executor's tokens, none banned (the mask needs the logits, not only the last stage's argmax)."""
    from noodle.executors import EXECUTORS
    from noodle.executors.generation import Sampling

    banned = set(reference(model_dir, [prompt], new)[0][0])
    sampling = Sampling(constraint=_Banned(banned))
    with EXECUTORS.get("local")(ex.plan, model_dir) as local:
        want = local.generate([list(prompt)], max_new_tokens=new, sampling=sampling).tokens
    got = ex.generate([list(prompt)], max_new_tokens=new, sampling=sampling).tokens
    assert got == want and not banned & set(got[0]), (got, want, banned)
