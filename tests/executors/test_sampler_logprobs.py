"""The sampler's log probabilities: log-softmax of the logits the token was drawn from."""

from __future__ import annotations

import pytest
import torch

from noodle.errors import SpecError
from noodle.executors.generation import LOGPROB_FLOOR, SampledToken, Sampler, Sampling


def test_greedy_logprobs_are_log_softmax_of_the_raw_logits() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(Sampling(logprobs=4))
    tokens = sampler(logits).tolist()
    want = torch.log_softmax(logits, dim=-1)
    for row, tok in enumerate(tokens):
        lp = sampler.last[row]
        assert lp.logprob == pytest.approx(float(want[row, tok]), abs=1e-6)
        assert [i for i, _ in lp.top] == torch.topk(want[row], 4).indices.tolist()
        assert lp.top[0] == (tok, pytest.approx(lp.logprob))
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_sampled_logprobs_follow_temperature_and_top_p() -> None:
    logits = torch.randn(1, 20, generator=torch.Generator().manual_seed(1))
    sampler = Sampler(Sampling(temperature=0.5, top_p=0.6, seed=3, logprobs=20))
    tok = int(sampler(logits)[0])
    top = dict(sampler.last[0].top)
    kept = {i for i, v in top.items() if v > LOGPROB_FLOOR}
    assert tok in kept and 0 < len(kept) < 20
    scaled = logits[0] / 0.5
    renorm = torch.log_softmax(scaled[sorted(kept)], dim=-1)  # the kept set, renormalized, is what was sampled from
    for j, i in enumerate(sorted(kept)):
        assert top[i] == pytest.approx(float(renorm[j]), abs=1e-5)
    assert sum(torch.tensor([top[i] for i in kept]).exp().tolist()) == pytest.approx(1.0, abs=1e-5)
    assert min(top.values()) == LOGPROB_FLOOR  # what top-p removed


def test_emitted_token_carries_logprobs_only_when_asked() -> None:
    logits = torch.randn(1, 10)
    plain = Sampler(Sampling())
    tok = int(plain(logits)[0])
    assert type(plain.emitted(tok)) is int
    asked = Sampler(Sampling(logprobs=0))
    got = asked.emitted(int(asked(logits)[0]))
    assert isinstance(got, SampledToken) and got == tok and got.logprobs.top == ()


def test_logprobs_bound_is_checked() -> None:
    with pytest.raises(SpecError, match="logprobs: must be in \\[0, 20\\], got 21"):
        Sampling(logprobs=21)
