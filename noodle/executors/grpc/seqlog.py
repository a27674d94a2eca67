"""What a grpc lane keeps of each sequence of its packed steps, to rebuild the sequence's KV elsewhere.

A packed step (continuous batching) carries chunks of many sequences; each sequence's KV cache on
the stage is the product of its own chunks only. So for every sequence in flight the lane records
its chunks in order, each with its slice of the step's input as this stage received it (token ids
or hidden states), and forgets a sequence when it ends. To rebuild the stage on another worker,
:meth:`SeqLog.replay` packs the records again: round ``r`` carries the ``r``-th chunk of every
sequence that has one (the first says ``start``), no chunk asks for logits, and a round is split
where it would pass the worker's ``max_seqs`` or ``max_step_tokens``.

Exactness after a replay: every chunk keeps its boundaries and its exact flag. In exact mode the
stage runs each chunk on its own, as the first time, so the rebuilt KV is bitwise the lost one and
the tokens are those of a run without failure. In continuous mode the first time a chunk shared a
forward with other sequences' chunks and now shares it with others again: the KV equals the lost
one up to floating-point reassociation (as packed steps equal sequences run alone).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from noodle.errors import ExecutorError
from noodle.executors.messages import SeqChunk, StageInput

__all__ = ["SeqLog", "Recorded"]


@dataclass(frozen=True)
class Recorded:
    """One chunk of one sequence as a stage received it."""

    chunk: SeqChunk
    data: torch.Tensor  # (1, tokens) token ids or (1, tokens, hidden) hidden states, a copy
    exact: bool


class SeqLog:
    """The recorded chunks of every sequence in flight on one lane, in order."""

    def __init__(self) -> None:
        self._seqs: dict[str, list[Recorded]] = {}

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, seq: object) -> bool:
        return seq in self._seqs

    def chunks(self) -> int:
        """Chunks recorded over every sequence (what a replay sends again)."""
        return sum(len(r) for r in self._seqs.values())

    def check(self, msg: StageInput, where: str) -> None:
        """Refuse a step that continues a sequence this lane never started (before it is sent)."""
        for c in msg.seqs:
            if not c.start and c.seq not in self._seqs:
                raise ExecutorError(f"{where}: unknown sequence {c.seq!r}; its first chunk must say start")

    def record(self, msg: StageInput) -> None:
        """Keep each chunk of a step that the worker ran, with a copy of its slice of the input."""
        offset = 0
        for c in msg.seqs:
            part = msg.data[:, offset : offset + c.tokens].clone()  # a copy: the step's tensor is not kept alive
            offset += c.tokens
            rec = Recorded(replace(c, logits=False), part, msg.exact)
            if c.start:
                self._seqs[c.seq] = [rec]
            else:
                self._seqs[c.seq].append(rec)

    def end(self, seq: str) -> bool:
        """Forget ``seq``; whether it was in flight here."""
        return self._seqs.pop(seq, None) is not None

    def clear(self) -> None:
        self._seqs.clear()

    def replay(self, max_seqs: int, max_step_tokens: int, session: str = "replay") -> Iterator[StageInput]:
        """The packed steps that rebuild every recorded sequence's KV on a fresh session, in order."""
        if max_seqs < 1 or max_step_tokens < 1:
            raise ExecutorError(f"replay: the worker's limits must be >= 1, got max_seqs {max_seqs}, "
                                f"max_step_tokens {max_step_tokens}")  # fmt: skip
        rounds = max((len(r) for r in self._seqs.values()), default=0)
        for r in range(rounds):
            batch: list[Recorded] = []
            tokens = 0
            for recs in self._seqs.values():
                if r >= len(recs):
                    continue
                rec = recs[r]
                full = len(batch) >= max_seqs or tokens + rec.chunk.tokens > max_step_tokens
                if batch and (full or rec.exact != batch[0].exact):
                    yield _step(batch, session)
                    batch, tokens = [], 0
                batch.append(rec)
                tokens += rec.chunk.tokens
            if batch:
                yield _step(batch, session)


def _step(batch: list[Recorded], session: str) -> StageInput:
    data = torch.cat([rec.data for rec in batch], dim=1)
    return StageInput(session, data, seqs=tuple(rec.chunk for rec in batch), exact=batch[0].exact)
