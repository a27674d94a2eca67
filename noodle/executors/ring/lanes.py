"""The ring as pipeline lanes: a sending lane and a receiving lane on the coordinator.

Messages go round ``coordinator -> rank 1 -> ... -> rank S -> coordinator`` and every rank
serves whatever arrives, in order, so replies come back in the order the steps were sent.
The pipeline's first lane sends a step into the ring and goes on with the next one; its
second lane receives replies in that same order. While rank 2 runs one step, rank 1
already runs the next.

Both lanes take packed steps (``batching="continuous"`` or ``"exact"``): a step of many
sequences travels as one message, its chunks in a table ahead of the packed tokens
(:mod:`~noodle.executors.ring.wire`). The driver names each sequence on the wire by an
integer it hands out at the sequence's first chunk and forgets when the sequence's end
comes back; an end frees that one sequence on every stage.

Failover (spawned workers only): when the ring breaks, under one lock the driver tears the
world down, respawns and reloads it, rebuilds the KV caches the lost world held, then sends
again, in their order, the messages that were in flight when it broke; the receiving lane
carries on. Every request in flight survives:

- grouped steps (``batching="groups"``): each group's completed steps are replayed as they
  were sent, so its caches come back bit for bit;
- packed steps: the batches mixed sequences that have come and gone since, so the steps are
  not replayed as sent. Each live sequence's completed chunks are replayed with their own
  boundaries instead, round ``r`` packing the ``r``-th chunk of every live sequence (under
  ``max_batch_tokens``). In exact mode each sequence runs alone inside a step, so its cache
  is rebuilt bit for bit and the tokens are those of a run without failure (``generate`` on
  the prompt alone). In continuous mode a sequence now shares its matmuls with other
  neighbours, so its rebuilt cache equals the lost one up to floating-point reassociation:
  the tolerance continuous batching always has against each sequence run alone, not a
  promise of the very tokens the broken run would have made.

When the world cannot be rebuilt (workers started elsewhere, ``restarts`` used up, or the
respawned world fails too), every request in flight fails with an
:class:`~noodle.errors.ExecutorError` that names the lost rank, and every later step fails
at once with the same message: nothing waits past the step timeout, nothing is answered
from a half-rebuilt cache.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from noodle.errors import ExecutorError, SpecError
from noodle.executors.batching import DEFAULT_MAX_BATCH_TOKENS, make_pipeline, resolve_batching
from noodle.executors.kvbudget import kv_capacity_tokens, max_positions, stage_layers
from noodle.executors.messages import SeqChunk, StageInput, StageOutput
from noodle.executors.netreport import FailoverEvent
from noodle.executors.requests import Lane
from noodle.executors.ring.transport import NO_REPLACEMENT, Ring
from noodle.executors.ring.wire import Flag, Op, RingHeader, WireChunk, step_flags
from noodle.executors.scheduler import Pipeline

if TYPE_CHECKING:
    from noodle.executors.ring.coordinator import TorchRpcExecutor

__all__ = ["RingDriver", "SendLane", "RecvLane", "ring_pipeline"]


@dataclass(frozen=True)
class _Sent:
    """A message in the ring: a session's step (``msg``), its end (``msg is None``) or a packed step (``chunks``)."""

    session: str
    msg: StageInput | None
    wire: int = 0  # the session's wire id (0 for a packed step: its chunks name the sequences)
    chunks: tuple[WireChunk, ...] = ()


class RingDriver:
    """Sends and receives the ring's messages for the two lanes; restarts a broken ring."""

    def __init__(self, ex: TorchRpcExecutor, *, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> None:
        self.ex = ex
        self.lock = threading.RLock()
        self.epoch = 0
        self.max_batch_tokens = max_batch_tokens  # a replay round of packed chunks is cut to this
        self._ids: dict[str, int] = {}  # session or sequence -> its wire id
        self._next_id = itertools.count(1_000_000)
        self._outstanding: deque[_Sent] = deque()  # sent, reply not yet received
        self._history: dict[str, list[StageInput]] = {}  # a group's steps whose replies came back, for replay
        self._fed: dict[str, list[list[int]]] = {}  # a packed sequence's chunks (token ids) that came back
        self._exact = False  # the packed steps' mode, for their replay
        self._broken: str | None = None  # why the ring is gone for good
        self.restarts_left = ex.restarts if ex.spawn else 0
        self.steps = 0

    # -- sending ---------------------------------------------------------------------------------
    def _send_raw(self, sent: _Sent, ring: Ring | None = None) -> None:
        ring = ring or self.ex._live_ring()
        msg = sent.msg
        if msg is None:
            ring.send(ring.header(Op.END, session=sent.wire), 1)
        elif sent.chunks:
            flags = Flag.EXACT if msg.exact else Flag.NONE
            ring.send_data(ring.header(Op.STEP, flags=flags), msg.data, None, 1, sent.chunks)
        else:
            ring.send_data(ring.header(Op.STEP, session=sent.wire, flags=step_flags(msg)), msg.data,
                           msg.attention_mask, 1)  # fmt: skip

    def _check_open(self) -> None:
        if self._broken is not None:
            raise ExecutorError(self._broken)

    def _packed(self, session: str, msg: StageInput) -> _Sent:
        """Name a packed step's sequences on the wire: a new id for each first chunk (under the lock)."""
        unknown = [c.seq for c in msg.seqs if not c.start and c.seq not in self._ids]
        if unknown:
            raise ExecutorError(f"torchrpc: unknown sequence {unknown[0]!r}; its first chunk must say start")
        for c in msg.seqs:
            if c.start:
                self._ids[c.seq] = next(self._next_id)
                self._fed[c.seq] = []
        self._exact = msg.exact
        return _Sent(session, msg, 0, tuple(WireChunk(self._ids[c.seq], c.tokens, c.start, c.logits) for c in msg.seqs))

    def send(self, session: str, msg: StageInput | None) -> None:
        """Put a step (``None``: the end of the session, or of one packed sequence) into the ring.

        The lock covers bookkeeping only, never a blocking send: rank 1 may wait for the
        coordinator to receive an earlier reply before it takes this message.
        """
        with self.lock:
            self._check_open()
            if msg is not None and msg.seqs:
                sent = self._packed(session, msg)
            else:
                if msg is not None and msg.prefill:
                    self._ids[session] = next(self._next_id)
                    self._history[session] = []
                if session not in self._ids:
                    if msg is None:
                        return
                    raise ExecutorError(f"torchrpc: unknown session {session!r}; start it with a prefill step")
                sent = _Sent(session, msg, self._ids[session])
            self._outstanding.append(sent)
            self.steps += 1
            epoch, ring = self.epoch, self.ex._live_ring()
        try:
            self._send_raw(sent, ring)
        except RuntimeError as exc:
            with self.lock:
                self._restart(f"sending to rank 1: {exc}", epoch)  # resends this message too

    # -- receiving -------------------------------------------------------------------------------
    def recv(self, session: str, *, end: bool) -> torch.Tensor | None:
        """The reply to the oldest message in flight (it must belong to ``session``)."""
        while True:
            with self.lock:  # not while a restart is under way
                self._check_open()
                head_of = self._outstanding[0] if self._outstanding else None
                if end and (head_of is None or head_of.session != session or head_of.msg is not None):
                    return None  # its end never went into the ring: the ring did not know the session
                epoch, ring = self.epoch, self.ex._live_ring()
            try:
                head, got = ring.recv(self.ex.world - 1, self.ex.policy.step_timeout_s)
                if head.op == Op.ERROR:
                    err = self.ex._remote_error(head)
                    if not isinstance(err, ExecutorError):  # a lost rank, reported by its neighbour
                        raise RuntimeError(str(err))
                    with self.lock:
                        self._pop(session, None, None, ())
                    raise err
                data: torch.Tensor | None = None
                chunks: tuple[WireChunk, ...] = ()
                if head.op != Op.END:
                    data, _, chunks = ring.recv_data(head, got, self.ex.world - 1, self.ex.policy.step_timeout_s)
            except RuntimeError as exc:
                with self.lock:
                    if self.epoch == epoch:
                        self._restart(f"waiting for a step to come round: {exc}", epoch)
                continue
            except SpecError as exc:  # a reply this coordinator cannot read (taken off the ring)
                with self.lock:
                    self._pop(session, None, None, ())
                raise ExecutorError(f"torchrpc: the reply to {session} was refused: {exc}") from None
            with self.lock:
                self._pop(session, head, data, chunks)
            if data is not None and not head.flags & Flag.LOGITS:
                raise ExecutorError(f"torchrpc: the ring returned hidden states, not logits, for {session}")
            return data

    def _pop(self, session: str, head: RingHeader | None, data: torch.Tensor | None,
             chunks: tuple[WireChunk, ...]) -> None:  # fmt: skip
        """Retire the oldest message in flight; ``head`` is its reply (``None``: it failed). Under the lock."""
        sent = self._outstanding.popleft()
        if sent.session != session:
            raise ExecutorError(f"torchrpc: replies out of order (expected {sent.session}, the pipeline waits for {session})")
        msg = sent.msg
        if msg is None:
            self._history.pop(session, None)
            self._fed.pop(session, None)
            self._ids.pop(session, None)
            return
        if head is None:
            return
        if head.op == Op.END or chunks != sent.chunks:
            raise ExecutorError(f"torchrpc: the reply to a step of {session} is not that step's "
                                f"({head.op.name}, {len(chunks)} chunks for {len(sent.chunks)} sent)")  # fmt: skip
        if sent.chunks:
            tokens = msg.data[0].tolist()
            offset = 0
            for c in msg.seqs:
                fed = self._fed.get(c.seq)
                if fed is not None:
                    fed.append(tokens[offset : offset + c.tokens])
                offset += c.tokens
        elif data is not None and session in self._history:
            self._history[session].append(msg)

    # -- failures --------------------------------------------------------------------------------
    def _replay(self, sent: _Sent) -> None:
        """Send one message into the rebuilt ring and wait for it to come round."""
        ex = self.ex
        self._send_raw(sent)
        ring = ex._live_ring()
        head, got = ring.recv(ex.world - 1, ex.policy.step_timeout_s)
        if head.op == Op.ERROR:
            raise ExecutorError(f"replaying {sent.session} failed: {ex._remote_error(head)}")
        ring.recv_data(head, got, ex.world - 1, ex.policy.step_timeout_s)

    def _replay_packed(self) -> int:
        """Rebuild every live packed sequence's KV: round ``r`` packs each one's ``r``-th chunk, cut to the budget."""
        live = [(seq, fed) for seq, fed in self._fed.items() if fed]
        rounds = max((len(fed) for _, fed in live), default=0)
        steps = 0
        for r in range(rounds):
            parts: list[list[tuple[str, list[int]]]] = [[]]
            for seq, fed in live:
                if r >= len(fed):
                    continue
                used = sum(len(t) for _, t in parts[-1])
                if parts[-1] and used + len(fed[r]) > self.max_batch_tokens:
                    parts.append([])
                parts[-1].append((seq, fed[r]))
            for part in filter(None, parts):
                seqs = tuple(SeqChunk(seq, len(t), start=r == 0) for seq, t in part)
                data = torch.tensor([[x for _, t in part for x in t]], dtype=torch.long)
                chunks = tuple(WireChunk(self._ids[c.seq], c.tokens, c.start) for c in seqs)
                self._replay(_Sent("replay", StageInput("replay", data, seqs=seqs, exact=self._exact), 0, chunks))
                steps += 1
        return steps

    def _restart(self, reason: str, epoch: int) -> None:
        self._check_open()  # a second lane that finds the ring gone keeps the first one's diagnosis
        if epoch != self.epoch:
            return
        ex = self.ex
        t0 = time.perf_counter()
        lost = ex._lost_ranks() if ex.spawn else "a rank died, hung or was cut off"
        ex._kill_world()
        if self.restarts_left <= 0:
            self._broken = f"torchrpc: the ring broke ({reason}); {lost}. {NO_REPLACEMENT}"
            raise ExecutorError(self._broken)
        self.restarts_left -= 1
        ex._log(f"noodle: torchrpc lost the ring ({reason}; {lost}); respawning {ex.world - 1} workers")
        replayed = 0
        try:
            ex._start()
            for session, steps in self._history.items():
                for msg in steps:
                    self._replay(_Sent(session, msg, self._ids[session]))
                    replayed += 1
            replayed += self._replay_packed()
            for sent in self._outstanding:
                self._send_raw(sent)
        except Exception as exc:  # noqa: BLE001 - whatever broke the rebuild, the ring is gone for good
            ex._kill_world()
            self._broken = f"torchrpc: the ring broke ({reason}; {lost}) and the respawned ring failed too ({exc})"
            raise ExecutorError(self._broken) from None
        self.epoch += 1
        what = f"{len(self._history)} group(s)" if self._history else f"{len(self._fed)} sequence(s)"
        detail = (f"respawned {ex.world - 1} workers, replayed {replayed} steps of {what} "
                  f"and resent {len(self._outstanding)} in flight")  # fmt: skip
        ex.failovers.append(FailoverEvent(step=self.steps, node=lost, reason=reason, action="restarted", detail=detail,
                                          replayed_steps=replayed, seconds=time.perf_counter() - t0))  # fmt: skip
        ex._log(f"noodle: failover: {detail} ({time.perf_counter() - t0:.2f} s)")


class SendLane:
    """Lane 0: sends a step into the ring and hands the pipeline's next lane a receipt."""

    packed_steps = True  # takes continuous batching's packed steps (noodle.executors.batching)

    def __init__(self, driver: RingDriver, name: str) -> None:
        self.driver, self.name = driver, name

    def run(self, msg: StageInput) -> StageOutput:
        self.driver.send(msg.session, msg)
        return StageOutput(msg.session, torch.empty(msg.batch_size, 0, 0), msg.attention_mask, False, msg.seqs, msg.exact)

    def end(self, session: str) -> None:
        self.driver.send(session, None)


class RecvLane:
    """Lane 1: receives the replies, in the order the steps went out."""

    ordered = True  # the pipeline must hand it steps in the order lane 0 sent them
    packed_steps = True

    def __init__(self, driver: RingDriver, name: str) -> None:
        self.driver, self.name = driver, name

    def run(self, msg: StageInput) -> StageOutput:
        data = self.driver.recv(msg.session, end=False)
        if data is None:
            raise ExecutorError(f"torchrpc: an end marker came back in place of a step of {msg.session}")
        return StageOutput(msg.session, data.cpu(), msg.attention_mask, True, msg.seqs, msg.exact)

    def end(self, session: str) -> None:
        self.driver.recv(session, end=True)


def ring_pipeline(ex: TorchRpcExecutor, *, concurrency: int, micro_batch: int, prefill_chunk: int, max_queue: int,
                  batching: str = "groups", max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> Pipeline:
    """A pipeline over ``ex``'s ring (see the module docstring); packed batches circulate one per stage."""
    ex._live_ring()
    driver = RingDriver(ex, max_batch_tokens=max_batch_tokens)
    stages = ex.plan.stages
    caps = kv_capacity_tokens(ex.plan, ex.config, ex.param_bytes, [stage_layers(s.layers) for s in stages])
    lanes: list[Lane] = [SendLane(driver, f"ring -> {stages[0].node}"), RecvLane(driver, f"{stages[-1].node} -> ring")]
    slots = {"slots": len(stages)} if resolve_batching(batching, lanes) in ("continuous", "exact") else {}
    return make_pipeline(
        lanes, batching=batching, max_batch_tokens=max_batch_tokens, eos_token_id=ex.eos_token_id, pad_token_id=ex.pad_token_id, concurrency=concurrency,
        micro_batch=micro_batch, prefill_chunk=prefill_chunk, max_queue=max_queue, kv_capacity_tokens=caps,
        max_context=max_positions(ex.config), failovers=lambda: list(ex.failovers), **slots,
    )  # fmt: skip
