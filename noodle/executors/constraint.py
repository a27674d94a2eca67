"""Per-request constrained decoding: the hook the sampler calls (mask -> sample -> advance).

A :class:`TokenConstraint` is what a request carries in its :class:`~noodle.executors.generation.Sampling`
(a compiled grammar, say); the sampler starts one :class:`ConstraintState` per request, masks the
last stage's logits of that request's row with it before sampling, and advances it with the sampled
token. Rows of other requests in the same batch are untouched, so constrained and free requests
share a step. The grammar library lives behind this protocol (``noodle.serve.grammar``); nothing here
imports it.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["TokenConstraint", "ConstraintState"]


class ConstraintState(Protocol):
    """One request's position in its grammar."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` ``(1, vocab)`` with every token the grammar forbids next set to ``-inf``."""
        ...

    def accept(self, token: int) -> None:
        """Advance past ``token`` (one the mask allowed)."""
        ...


class TokenConstraint(Protocol):
    """A grammar a request's tokens must follow; :meth:`start` gives a fresh state per sequence."""

    def start(self) -> ConstraintState: ...
