"""The generation loop every executor shares: padding, sampling, stopping.

An executor only supplies ``forward(StageInput) -> logits``: one step pushed
through all its stages. Keeping the loop here is what makes every executor
produce the same tokens as ``local`` on the same plan. Stopping follows
``transformers``' ``generate``: a sequence that emitted EOS continues with the
pad token, and the loop ends when every sequence has finished or after
``max_new_tokens`` steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from noodle.errors import SpecError
from noodle.models.card import token_ids_of
from noodle.sizes import MAX_LOGPROBS
from noodle.executors.messages import StageInput

if TYPE_CHECKING:
    from noodle.executors.constraint import TokenConstraint

__all__ = [
    "Sampling",
    "Generation",
    "Sampler",
    "SampledToken",
    "TokenLogprobs",
    "MAX_LOGPROBS",
    "left_pad",
    "generate",
    "new_session_id",
    "token_ids_of",
]


_session_counter = itertools.count()


def new_session_id(prefix: str = "s") -> str:
    """A process-unique session id."""
    return f"{prefix}{next(_session_counter)}"


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; ``temperature == 0`` is greedy (the default).

    Attributes:
        temperature: divide logits by this before sampling; 0 picks the argmax.
        top_k: keep the ``k`` most likely tokens (0 keeps all).
        top_p: keep the smallest set of tokens whose probability reaches ``p`` (1.0 keeps all).
        seed: seed of the sampler's own random generator (sampling only).
        logprobs: also compute log probabilities (see :class:`Sampler`): ``None`` does not, ``0`` gives
            the sampled token's, ``N`` also the ``N`` most likely tokens'.
        constraint: a grammar the tokens must follow (one sequence per sampler): its mask is applied to
            the logits before sampling (see :mod:`noodle.executors.constraint`).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    logprobs: int | None = None
    constraint: TokenConstraint | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise SpecError(f"--temperature: must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise SpecError(f"--top-k: must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SpecError(f"--top-p: must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise SpecError(f"logprobs: must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def argmax_only(self) -> bool:
        """Whether the sampler needs only each row's argmax (greedy, no log probabilities, no grammar mask):
        a distributed last stage may then send token ids instead of logits."""
        return self.greedy and self.logprobs is None and self.constraint is None


@dataclass(frozen=True)
class TokenLogprobs:
    """Log probabilities of one sampled token: its own, and the ``top`` most likely ``(id, logprob)``, best first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class SampledToken(int):
    """A sampled token id (an ``int``) carrying its :class:`TokenLogprobs`; ``on_token`` gets one when asked."""

    logprobs: TokenLogprobs

    def __new__(cls, token: int, logprobs: TokenLogprobs) -> SampledToken:
        obj = super().__new__(cls, token)
        obj.logprobs = logprobs
        return obj


LOGPROB_FLOOR = -9999.0  # a token the processing removed (top-k/top-p: -inf) is reported at this, as vLLM does


class Sampler:
    """Turns last-position logits ``(batch, vocab)`` into next tokens ``(batch,)``.

    With ``sampling.logprobs`` set, each call also keeps :attr:`last`: per row, the log-softmax of
    the *processed* logits the token was drawn from (divided by the temperature, after top-k and
    top-p; greedy: the raw logits), so the sampled token's probability is the one it was drawn with.
    """

    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling
        self._gen = torch.Generator().manual_seed(sampling.seed)
        self.last: list[TokenLogprobs] = []
        self._grammar = None if sampling.constraint is None else sampling.constraint.start()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self._grammar is None:
            return self._sample(logits)
        if logits.shape[0] != 1:
            raise ValueError(f"a constrained sampler draws one sequence, got {logits.shape[0]} rows")
        tokens = self._sample(self._grammar.mask(logits))
        self._grammar.accept(int(tokens[0]))
        return tokens

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        if s.greedy:
            tokens = logits.argmax(dim=-1)
            self._keep(logits, tokens)
            return tokens
        scores = logits.float() / s.temperature
        if s.top_k > 0:
            k = min(s.top_k, scores.shape[-1])
            kth = torch.topk(scores, k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if s.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            drop = cum - sorted_scores.softmax(dim=-1) >= s.top_p  # keep the token that crosses p
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
        probs = scores.softmax(dim=-1)
        tokens = torch.multinomial(probs, 1, generator=self._gen).squeeze(-1)
        self._keep(scores, tokens)
        return tokens

    def _keep(self, scores: torch.Tensor, tokens: torch.Tensor) -> None:
        n = self.sampling.logprobs
        if n is None:
            return
        logp = torch.log_softmax(scores.float(), dim=-1).clamp_min(LOGPROB_FLOOR)
        chosen = logp.gather(-1, tokens.view(-1, 1)).squeeze(-1).tolist()
        if n:
            values, ids = torch.topk(logp, min(n, logp.shape[-1]), dim=-1)
            tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        else:
            tops = [() for _ in chosen]
        self.last = [TokenLogprobs(float(c), top) for c, top in zip(chosen, tops)]

    def emitted(self, token: int, row: int = 0) -> int:
        """What ``on_token`` receives for ``token`` of ``row``: the id, with its log probabilities when asked."""
        if self.sampling.logprobs is None or row >= len(self.last):
            return token
        return SampledToken(token, self.last[row])


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids ``(batch, longest)`` padded on the left, and the 0/1 mask (``None`` without padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SpecError("prompt: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids, (None if bool(mask.all()) else mask)


@dataclass(frozen=True)
class Generation:
    """New tokens per prompt (equal lengths, padded after EOS like ``generate``) and per-step logits."""

    tokens: list[list[int]]
    steps: int
    logits: list[torch.Tensor] = field(default_factory=list)


def generate(
    forward: Callable[[StageInput], torch.Tensor],
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    session: str | None = None,
    keep_logits: bool = False,
) -> Generation:
    """Decode up to ``max_new_tokens`` tokens for each prompt through ``forward``.

    Args:
        forward: runs one step through every stage and returns last-position logits
            ``(batch, vocab)``.
        prompts: token ids per prompt; shorter prompts are padded on the left.
        keep_logits: also return the logits of every step (for conformance tests).
    """
    if max_new_tokens < 1:
        raise SpecError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    session = session or new_session_id()
    ids, mask = left_pad(prompts, pad_token_id)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []), dtype=torch.long)
    sampler = Sampler(sampling)
    unfinished = torch.ones(len(prompts), dtype=torch.bool)
    out: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    msg = StageInput(session, ids, mask, prefill=True)
    for step in range(max_new_tokens):
        logits = forward(msg)
        if keep_logits:
            kept.append(logits)
        nxt = sampler(logits)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
        out.append(nxt)
        if eos.numel():
            unfinished &= ~torch.isin(nxt, eos)
        if not bool(unfinished.any()) or step == max_new_tokens - 1:
            break
        new_mask = None if mask is None else torch.ones(len(prompts), 1, dtype=torch.long)
        msg = StageInput(session, nxt.unsqueeze(-1), new_mask, prefill=False)
    tokens = torch.stack(out, dim=1).tolist()
    return Generation(tokens=tokens, steps=len(out), logits=kept)
