"""Continuous batching: every stage steps all the sequences it holds in one forward.

:class:`BatchingPipeline` keeps the lanes, threads, queue, stats and callbacks of
:class:`~noodle.executors.scheduler.Pipeline` and changes what circulates. Instead of fixed
groups, ``slots`` batches (one per stage by default, so every stage has one to work on) go
round the pipeline. A batch is rebuilt each time it comes back from the last stage:

1. the logits of its chunks that asked for them are sampled, each row with its request's own
   sampler; finished sequences leave (their KV freed on every stage) at once;
2. waiting requests join the slot while fewer than ``concurrency`` sequences are in flight and
   the stages' KV budget holds their context (a slot takes at most its share,
   ``ceil(concurrency / slots)``, so the batches stay even);
3. the next step packs one decode token per decoding sequence, then prefill chunks of the
   sequences still reading their prompt, under ``max_batch_tokens`` (``prefill_chunk`` caps one
   sequence's chunk). A long prompt is read over several steps beside the others' decodes, so
   new requests start while old ones stream.

The step crosses every stage as one message (:class:`~noodle.executors.messages.SeqChunk` s and
the packed tokens). ``exact=True`` runs each sequence on its own inside the step and reads each
prompt whole (or in ``prefill_chunk`` pieces): the tokens are then those of ``generate`` on each
prompt alone, whatever else is in flight (the reference).

KV memory (the tightest stage's ``kv_capacity_tokens``) is shared the way a paged cache shares it.
A sequence is admitted when its prompt fits beside what the others hold (keeping a small headroom
for their next tokens), and grows by one token per decode step. When a step's growth would not fit,
the slot preempts its most recently admitted sequence: its KV is freed on every stage and it goes
back to the front of the queue, to be read again later as prompt + the tokens it has generated
(recompute: nothing it produced is lost, its sampler goes on where it was). ``exact=True`` instead
reserves each sequence's whole context (prompt + ``max_new_tokens``) on admission and never
preempts, since reading generated tokens again as a prompt would round differently from decoding
them (a stage's buffers round each sequence up to whole KV blocks,
:data:`noodle.executors.packed.BLOCK` tokens, in either mode).
A step's result is matched to its slot by a step number, so a late answer of a failed step is
dropped; a result whose logits rows do not match the chunks that asked for them fails the step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from noodle.errors import SpecError
from noodle.executors.messages import SeqChunk, StageInput
from noodle.executors.requests import Lane, PipelineStats, _End, _Request, _Step
from noodle.executors.scheduler import Pipeline

__all__ = ["BATCHING_MODES", "BatchingPipeline", "DEFAULT_MAX_BATCH_TOKENS", "resolve_batching", "make_pipeline"]

DEFAULT_MAX_BATCH_TOKENS = 256


@dataclass(eq=False)
class _Seq:
    req: _Request
    ids: list[int]  # what its KV must hold before it decodes (the prompt; after a preemption + its tokens)
    reserved: int  # KV tokens counted against the budget for it
    fed: int = 0  # tokens of ``ids`` sent so far

    @property
    def reading(self) -> bool:
        return self.fed < len(self.ids)


@dataclass(eq=False)
class _Slot:
    sid: int
    members: list[_Seq] = field(default_factory=list)
    step: list[tuple[_Seq, SeqChunk]] = field(default_factory=list)  # what is in flight
    busy: bool = False
    epoch: int = 0  # counts the slot's steps: a result or error of an older step is stale

    @property
    def requests(self) -> list[_Request]:  # what Pipeline.stats counts
        return [s.req for s in self.members]


class BatchingPipeline(Pipeline):
    """Serves many requests at once, every running sequence in one batched step per stage.

    Args (beyond :class:`~noodle.executors.scheduler.Pipeline`'s):
        concurrency: sequences in flight at most (>= 1).
        max_batch_tokens: tokens one step may carry: decode tokens always go; prefill chunks fill the
            rest, and at least a quarter of it, so prompts are read even when many sequences decode.
        slots: batches circulating (default: one per stage).
        exact: one forward per sequence inside each step, prompts read whole (or in ``prefill_chunk``
            pieces): tokens identical to ``generate`` on each prompt alone.
    """

    def __init__(self, lanes: Sequence[Lane], *, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 slots: int | None = None, exact: bool = False, **kwargs: Any) -> None:  # fmt: skip
        if kwargs.get("micro_batch", 1) != 1:
            raise SpecError("--micro-batch: continuous batching batches every sequence in flight; leave it at 1")
        super().__init__(lanes, **kwargs)
        n_slots = len(self.lanes) if slots is None else slots
        for name, value in (("max_batch_tokens", max_batch_tokens), ("slots", n_slots)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"--{name.replace('_', '-')}: must be an integer >= 1, got {value!r}")
        self.max_batch_tokens = max_batch_tokens
        self.exact = exact
        self._slots = [_Slot(i) for i in range(n_slots)]
        self._groups = {s.sid: s for s in self._slots}  # type: ignore[misc]  # stats count their requests
        self._share = max(1, math.ceil(self.concurrency / n_slots))
        self.preemptions = 0

    @property
    def batching(self) -> str:
        return "exact" if self.exact else "continuous"

    def _members(self) -> int:
        return sum(len(s.members) for s in self._slots)

    def _slot_of(self, gid: int) -> _Slot | None:
        """The slot a step id names, if that step is the one in flight (else a stale result: None)."""
        slot = self._slots[gid % len(self._slots)]
        return slot if slot.busy and slot.epoch == gid // len(self._slots) else None

    # -- admission and steps ---------------------------------------------------------------------
    def _admit(self) -> None:
        for slot in self._slots:
            if slot.busy:
                continue
            self._join(slot)
            self._send(slot)

    def _join(self, slot: _Slot) -> None:
        now = time.monotonic()
        with self._lock:
            while self._waiting and len(slot.members) < self._share and self._members() < self.concurrency:
                req = self._waiting[0]
                ids = list(req.prompt) + req.tokens  # a preempted request reads what it generated again
                need = len(req.prompt) + req.max_new_tokens if self.exact else len(ids)
                if self._kv_cap is not None and self._members():
                    headroom = 0 if self.exact else self._members() + 1 + self._kv_cap // 64
                    if self._reserved + need + headroom > self._kv_cap:
                        break  # waits until a sequence ends (or is preempted) and frees its KV
                self._waiting.popleft()
                self._reserved += need
                req.t_admit = req.t_admit or now
                slot.members.append(_Seq(req, ids, need))
            self._peak = max(self._peak, self._members())

    def _make_room(self, slot: _Slot) -> None:
        """Preempt the slot's newest sequences until its decoding ones can each grow by a token."""
        if self.exact or self._kv_cap is None:
            return
        while True:
            growing = [s for s in slot.members if not s.reading and s.req.finish is None]
            if not growing or self._reserved + len(growing) <= self._kv_cap:
                break
            victim = max(slot.members, key=lambda s: s.req.t_admit or 0.0)
            slot.members.remove(victim)
            with self._lock:
                self._reserved -= victim.reserved
                self._waiting.appendleft(victim.req)
                self.preemptions += 1
            if victim.fed:
                self._queues[0].put(_End(victim.req.rid))
        for s in slot.members:
            if not s.reading and s.req.finish is None:
                s.reserved += 1
                with self._lock:
                    self._reserved += 1

    def _send(self, slot: _Slot) -> None:
        self._make_room(slot)
        step: list[tuple[_Seq, SeqChunk]] = []
        data: list[int] = []
        for s in slot.members:
            if not s.reading and s.req.finish is None:
                step.append((s, SeqChunk(s.req.rid, 1, logits=True)))
                data.append(s.req.tokens[-1])
        budget = max(self.max_batch_tokens - len(step), self.max_batch_tokens // 4, 1)
        for s in slot.members:
            if not s.reading or s.req.finish is not None or budget <= 0:
                continue
            left = len(s.ids) - s.fed
            n = left if self.exact else min(left, budget)  # exact mode reads a prompt whole (chunks differ in rounding)
            n = min(n, self.prefill_chunk or n)
            done = s.fed + n == len(s.ids)
            step.append((s, SeqChunk(s.req.rid, n, start=s.fed == 0, logits=done)))
            data.extend(s.ids[s.fed : s.fed + n])
            s.fed += n
            budget -= n
        if not step:
            return
        slot.epoch += 1
        slot.step, slot.busy = step, True
        msg = StageInput(f"b{slot.sid}", torch.tensor([data], dtype=torch.long), seqs=tuple(c for _, c in step),
                         exact=self.exact)  # fmt: skip
        self._queues[0].put(_Step(slot.epoch * len(self._slots) + slot.sid, msg, final=True))

    def _on_logits(self, gid: int, logits: torch.Tensor) -> None:
        slot = self._slot_of(gid)
        if slot is None:
            return
        want = sum(1 for _, c in slot.step if c.logits)
        if logits.dim() != 2 or logits.shape[0] != want:
            self._fail_group(gid, f"the last stage returned {tuple(logits.shape)} logits for {want} sequence(s)")
            return
        step, slot.step, slot.busy = slot.step, [], False
        now = time.monotonic()
        rows = iter(range(want))
        emitted: list[tuple[_Request, int]] = []
        for s, chunk in step:
            if not chunk.logits:
                continue
            row = next(rows)
            req = s.req
            if req.finish is not None:
                continue
            scores = logits[row : row + 1]
            try:
                if bool(torch.isnan(scores).any()) or bool(torch.isposinf(scores).any()):
                    raise ValueError("the logits hold NaN or +inf")
                token = int(req.sampler(scores)[0])
            except Exception as exc:  # noqa: BLE001 - bad logits end this request, not the engine
                req.finish, req.error = "error", f"sampling failed: {exc}"
                continue
            req.tokens.append(token)
            req.stamps.append(now)
            emitted.append((req, req.sampler.emitted(token)))
            if token in self._eos:
                req.finish = "stop"
            elif len(req.tokens) >= req.max_new_tokens:
                req.finish = "length"
        with self._lock:
            self._tokens += len(emitted)
            self._token_times.extend([now] * len(emitted))
        gone = self._retire(slot, notify=False)
        try:
            self._join(slot)  # the next step leaves before any callback runs: the stages never wait on them
            self._send(slot)
        finally:
            for req, token in emitted:
                self._call(req.on_token, token, req)
            for req in gone:
                self._finish(req)

    def _retire(self, slot: _Slot, *, notify: bool = True) -> list[_Request]:
        """End the slot's finished sequences: free their KV everywhere, notify them (or return them)."""
        gone = [s for s in slot.members if s.req.finish is not None]
        for s in gone:
            slot.members.remove(s)
            with self._lock:
                self._reserved -= s.reserved
            if s.fed:
                self._queues[0].put(_End(s.req.rid))
            if notify:
                self._finish(s.req)
        return [s.req for s in gone]

    # -- failures and cancellation ---------------------------------------------------------------
    def _fail_group(self, gid: int, text: str) -> None:
        slot = self._slot_of(gid)
        if slot is None:
            return
        step, slot.step, slot.busy = slot.step, [], False
        for s, _ in step:
            if s.req.finish is None:
                s.req.finish, s.req.error = "error", text
        self._retire(slot)

    def _cancel(self, rid: str) -> None:
        with self._lock:
            req = self._by_rid.get(rid)
            if req is None or req.finish is not None:
                return
            req.finish = "cancelled"
            if req in self._waiting:
                self._waiting.remove(req)
                queued = True
            else:
                queued = False
        if queued:
            self._finish(req)
        # an admitted sequence is freed when its slot's step comes back (every slot with members is in flight)

    def _fail_everything(self, text: str) -> None:
        self._cancel_waiting(text)
        for slot in self._slots:
            for s in slot.members:
                if s.req.finish is None:
                    s.req.finish, s.req.error = "cancelled", text
            slot.step, slot.busy = [], False
            self._retire(slot)

    def stats(self, window_s: float = 10.0) -> PipelineStats:
        """As :meth:`Pipeline.stats`; ``groups_in_flight`` counts the batches now in the pipeline."""
        snap = super().stats(window_s)
        return replace(snap, groups_in_flight=sum(1 for s in self._slots if s.busy), preemptions=self.preemptions)


BATCHING_MODES = ("auto", "continuous", "exact", "groups")


def resolve_batching(batching: str, lanes: Sequence[Lane]) -> str:
    """``auto`` -> ``continuous`` where every stage takes packed steps, else ``groups``; the rest as given."""
    if batching != "auto":
        return batching
    return "continuous" if all(getattr(lane, "packed_steps", False) for lane in lanes) else "groups"


def make_pipeline(lanes: Sequence[Lane], *, batching: str = "groups", max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                  **kwargs: Any) -> Pipeline:  # fmt: skip
    """The engine for ``batching``: ``continuous`` (every sequence in one batched step per stage, the
    serving default), ``exact`` (the same scheduler, one forward per sequence: ``generate``'s tokens), or
    ``groups`` (fixed left-padded groups of ``micro_batch`` requests, each its own KV session), or ``auto``
    (:func:`resolve_batching`)."""
    batching = resolve_batching(batching, lanes)
    if batching == "groups":
        return Pipeline(lanes, **kwargs)
    if batching in ("continuous", "exact"):
        other = [lane.name for lane in lanes if not getattr(lane, "packed_steps", False)]
        if other:
            raise SpecError(f"--batching {batching}: this backend's stages ({', '.join(other)}) do not take packed steps "
                            "yet; use --batching groups (or the local backend)")  # fmt: skip
        return BatchingPipeline(lanes, exact=batching == "exact", max_batch_tokens=max_batch_tokens, **kwargs)
    raise SpecError(f"--batching: must be one of {', '.join(BATCHING_MODES)}, got {batching!r}")
