"""What a worker checks in a ``Forward`` request before it runs a stage, and the status it answers.

Every check raises :class:`Refused` with the gRPC status and one line naming the field and the
numbers; the worker answers it and keeps serving. Two kinds of step arrive:

- a batch step (``data`` ``(batch, tokens)`` / ``(batch, tokens, hidden)``, an optional padding
  mask): :func:`check_input` and :func:`check_batch_positions`;
- a packed step (continuous batching, ``seqs`` set): :func:`check_input` for the tensor, then
  :func:`check_packed` (the chunks against the tensor and the worker's limits, no session state)
  and :func:`admit_packed` (the chunks against the session's live sequences, under the compute lock).

A packed session's sequences live on the stage under :func:`seq_key`, namespaced by the worker
session: two coordinators' (or two lanes') sequence ids never meet, and a session id cannot forge
another's key (session and sequence ids are printable; the key's separator is not).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import torch

from noodle.executors.grpc import stage_service_pb2 as pb
from noodle.executors.messages import SeqChunk

__all__ = [
    "Refused", "PackedLimits", "check_id", "check_input", "check_batch_positions", "check_packed", "admit_packed",
    "seq_key", "chunks_to_proto",
]  # fmt: skip

_BAD = grpc.StatusCode.INVALID_ARGUMENT
_STATE = grpc.StatusCode.FAILED_PRECONDITION
MAX_ID_CHARS = 128


class Refused(Exception):
    """A request the worker refuses, with the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PackedLimits:
    """A worker's limits on packed steps.

    Attributes:
        max_seqs: live sequences one packed session may hold (and chunks one step may carry).
        max_step_tokens: tokens one packed step may carry.
        max_positions: the model's context (``None``: unchecked).
    """

    max_seqs: int
    max_step_tokens: int
    max_positions: int | None


def check_id(value: str, field: str) -> None:
    """A session or sequence id: 1 to 128 printable characters."""
    if not value or len(value) > MAX_ID_CHARS or not value.isprintable():
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise Refused(_BAD, f"{field}: give an id of 1 to {MAX_ID_CHARS} printable characters, got {shown!r} "
                            f"({len(value)} characters)")  # fmt: skip


def seq_key(session: str, seq: str) -> str:
    """The stage's KV key of sequence ``seq`` of packed session ``session``."""
    return f"\x00{session}\x00{seq}"


def chunks_to_proto(seqs: Sequence[SeqChunk]) -> list[pb.SeqChunk]:
    return [pb.SeqChunk(seq=c.seq, tokens=c.tokens, start=c.start, logits=c.logits) for c in seqs]


def check_input(first: bool, hidden: int, want: torch.dtype, vocab_size: int, data: torch.Tensor,
                mask: torch.Tensor | None) -> None:  # fmt: skip
    """The tensor fits the stage: token ids in the vocabulary (first stage) or hidden states of its width and dtype."""
    if first:
        if data.dtype not in (torch.int64, torch.int32) or data.dim() != 2:
            raise Refused(_BAD, f"data: the first stage takes int64 token ids (batch, tokens), got {data.dtype} {list(data.shape)}")
        if data.numel() and (int(data.min()) < 0 or int(data.max()) >= vocab_size):
            raise Refused(_BAD, f"data: token ids must lie in [0, {vocab_size}), got [{int(data.min())}, {int(data.max())}]")
    else:
        if data.dim() != 3 or data.shape[-1] != hidden:
            raise Refused(_BAD, f"data: stage takes hidden states (batch, tokens, {hidden}), got {list(data.shape)}")
        if data.dtype != want:
            raise Refused(_BAD, f"data.dtype: stage computes in {str(want).removeprefix('torch.')}, got "
                                f"{str(data.dtype).removeprefix('torch.')}")  # fmt: skip
    if data.shape[0] < 1 or data.shape[1] < 1:
        raise Refused(_BAD, f"data: empty batch or no tokens, shape {list(data.shape)}")
    if mask is not None:
        if mask.dtype not in (torch.int64, torch.int32) or tuple(mask.shape) != tuple(data.shape[:2]):
            raise Refused(_BAD, f"attention_mask: expected int64 {list(data.shape[:2])}, got {mask.dtype} {list(mask.shape)}")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise Refused(_BAD, "attention_mask: values must be 0 or 1")


def check_batch_positions(session: str, prefill: bool, batch: int, tokens: int, *, seen: int, prefilled_batch: int,
                          max_batch: int, max_positions: int | None) -> None:  # fmt: skip
    """A batch step fits its session: batch within ``max_batch`` and its prefill's, positions within the model's."""
    if batch > max_batch:
        raise Refused(_BAD, f"data: batch of {batch} sequences, over this worker's limit of {max_batch} (--max-batch)")
    if not prefill and batch != prefilled_batch:
        raise Refused(_BAD, f"data: session {session!r} was prefilled with batch {prefilled_batch}, got {batch} sequences")
    used = 0 if prefill else seen
    if max_positions is not None and used + tokens > max_positions:
        what = f"a prefill of {tokens} tokens" if prefill else f"{tokens} more token(s) after {used}"
        raise Refused(_BAD, f"data: {what} would pass the model's {max_positions} positions")


def check_packed(req: pb.ForwardRequest, data: torch.Tensor, limits: PackedLimits) -> tuple[SeqChunk, ...]:
    """The chunks of a packed request, checked against its tensor and the worker's limits (no session state).

    ``data`` has passed :func:`check_input`. The chunks keep their wire ids (see :func:`seq_key`).
    """
    n = len(req.seqs)
    if n > limits.max_seqs:
        raise Refused(_BAD, f"seqs: {n} sequences in one step, over this worker's limit of {limits.max_seqs} (--max-seqs)")
    for flag in ("prefill", "all_logits"):
        if getattr(req, flag):
            raise Refused(_BAD, f"{flag}: unused in a packed step (each chunk says start and logits); leave it false")
    if req.HasField("attention_mask"):
        raise Refused(_BAD, "attention_mask: a packed step has no padding; leave it unset")
    if data.shape[0] != 1:
        raise Refused(_BAD, f"data: a packed step carries batch 1 (the sequences back to back), got shape {list(data.shape)}")
    out: list[SeqChunk] = []
    seen: set[str] = set()
    for i, c in enumerate(req.seqs):
        check_id(c.seq, f"seqs[{i}].seq")
        if c.seq in seen:
            raise Refused(_BAD, f"seqs[{i}].seq: sequence {c.seq!r} appears twice in one step")
        seen.add(c.seq)
        if c.tokens < 1:
            raise Refused(_BAD, f"seqs[{i}].tokens: sequence {c.seq!r} brings {c.tokens} tokens; each chunk brings >= 1")
        out.append(SeqChunk(c.seq, int(c.tokens), start=c.start, logits=c.logits))
    total = sum(c.tokens for c in out)
    if total != data.shape[1]:
        raise Refused(_BAD, f"seqs: the chunks bring {total} tokens, data holds {int(data.shape[1])} "
                            f"(shape {list(data.shape)}); they must be equal")  # fmt: skip
    if total > limits.max_step_tokens:
        raise Refused(_BAD, f"data: a packed step of {total} tokens, over this worker's limit of "
                            f"{limits.max_step_tokens} (--max-step-tokens)")  # fmt: skip
    return tuple(out)


def admit_packed(session: str, chunks: Sequence[SeqChunk], live: Mapping[str, int], limits: PackedLimits) -> dict[str, int]:
    """The session's live sequences after the step (id -> positions used), or a refusal.

    A chunk continues a live sequence unless it says ``start`` (then the id must be new); each
    sequence's positions stay within the model's; the session holds at most ``max_seqs`` sequences.
    """
    after = dict(live)
    for i, c in enumerate(chunks):
        if c.start:
            if c.seq in live:
                raise Refused(_STATE, f"seqs[{i}]: sequence {c.seq!r} of session {session!r} is live already "
                                      f"({live[c.seq]} positions); end it before starting it again")  # fmt: skip
            used = 0
        elif c.seq not in live:
            raise Refused(_STATE, f"seqs[{i}]: unknown sequence {c.seq!r} in session {session!r}; its first chunk "
                                  "must say start")  # fmt: skip
        else:
            used = live[c.seq]
        if limits.max_positions is not None and used + c.tokens > limits.max_positions:
            raise Refused(_BAD, f"seqs[{i}]: sequence {c.seq!r}: {c.tokens} more token(s) after {used} would pass "
                                f"the model's {limits.max_positions} positions")  # fmt: skip
        after[c.seq] = used + c.tokens
    if len(after) > limits.max_seqs:
        raise Refused(_STATE, f"seqs: session {session!r} would hold {len(after)} live sequences ({len(live)} now), "
                              f"over this worker's limit of {limits.max_seqs} (--max-seqs); end some first")  # fmt: skip
    return after
