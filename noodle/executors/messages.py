"""What one stage hands to the next: plain tensors plus a little metadata.

A :class:`StageInput` goes into :meth:`StageRunner.step`; a :class:`StageOutput` comes
out. Both are frozen and hold only ``torch.Tensor`` s, strings, ints and bools:
in-process executors pass the objects as they are, the gRPC executor and the ring
move their tensors with :mod:`noodle.executors.codec` and the rest as typed fields
of their own messages.

Everything else a stage needs (position ids, the 4-D attention mask, rotary
embeddings) is recomputed inside the stage from the session's 2-D padding mask,
which grows by the ``attention_mask`` columns each step brings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SeqChunk", "StageInput", "StageOutput", "payload_bytes"]


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's share of a packed step (continuous batching, :mod:`noodle.executors.packed`).

    Attributes:
        seq: the sequence's id (one KV cache per id on every stage).
        tokens: how many of the step's packed tokens are this sequence's (>= 1), in order.
        start: its first chunk: the stage starts a fresh KV cache for it.
        logits: the last stage returns the logits of this chunk's last token.
    """

    seq: str
    tokens: int
    start: bool = False
    logits: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"SeqChunk {self.seq!r}: tokens must be an integer >= 1, got {self.tokens!r}")


@dataclass(frozen=True)
class StageInput:
    """One step of one session for one stage.

    Attributes:
        session: id of the generation this step belongs to (one KV cache per id).
        data: token ids ``(batch, new_tokens)`` int64 for the first stage, hidden
            states ``(batch, new_tokens, hidden)`` for the others.
        attention_mask: ``(batch, new_tokens)`` 0/1 padding mask of the new tokens;
            ``None`` means all ones (no padding).
        prefill: ``True`` starts the session (a fresh KV cache), ``False`` continues it.
        all_logits: the last stage returns logits of every new position, not only the last.
        seqs: a packed step: ``data`` is ``(1, N)`` / ``(1, N, hidden)``, the new tokens of these
            sequences back to back (``session`` then names the step's batch; ``attention_mask``,
            ``prefill`` and ``all_logits`` are unused). The last stage returns ``(M, 1, vocab)``
            logits, one row per chunk with ``logits`` set, in order.
        exact: with ``seqs``, run each sequence on its own (the reference) instead of in one forward.
    """

    session: str
    data: torch.Tensor
    attention_mask: torch.Tensor | None = None
    prefill: bool = False
    all_logits: bool = False
    seqs: tuple[SeqChunk, ...] = ()
    exact: bool = False

    @property
    def batch_size(self) -> int:
        return len(self.seqs) if self.seqs else int(self.data.shape[0])

    @property
    def packed(self) -> bool:
        return bool(self.seqs)

    @property
    def new_tokens(self) -> int:
        return int(self.data.shape[1])

    def nbytes(self) -> int:
        """Bytes of tensor payload this message carries."""
        return payload_bytes(self.data, self.attention_mask)


@dataclass(frozen=True)
class StageOutput:
    """What a stage produced: hidden states for the next stage, or logits from the last.

    Attributes:
        session: the session id of the input.
        data: hidden states ``(batch, new_tokens, hidden)`` or logits
            ``(batch, positions, vocab)`` (``positions`` is 1 unless ``all_logits``).
        attention_mask: the input's padding mask, passed on unchanged.
        is_logits: ``True`` when ``data`` holds logits (the stage holds ``lm_head``).
        seqs, exact: a packed step's chunks and mode, passed on unchanged.
    """

    session: str
    data: torch.Tensor
    attention_mask: torch.Tensor | None = None
    is_logits: bool = False
    seqs: tuple[SeqChunk, ...] = ()
    exact: bool = False

    def nbytes(self) -> int:
        return payload_bytes(self.data, self.attention_mask)

    def next_input(self, *, prefill: bool, all_logits: bool = False) -> StageInput:
        """The input of the following stage."""
        return StageInput(self.session, self.data, self.attention_mask, prefill, all_logits, self.seqs, self.exact)


def payload_bytes(*tensors: torch.Tensor | None) -> int:
    """Total bytes of the given tensors (``None`` counts as zero)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)

