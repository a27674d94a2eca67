"""The ring as pipeline lanes: a sending lane and a receiving lane on the coordinator.

Messages go round ``coordinator -> rank 1 -> ... -> rank S -> coordinator`` and every rank
serves whatever session arrives, in order, so replies come back in the order the steps
were sent. The pipeline's first lane sends a group's step into the ring and goes on with
the next group's; its second lane receives replies in that same order. While rank 2 runs
group ``g``, rank 1 already runs group ``g+1``.

Failover (spawned workers only): when the ring breaks, under one lock the driver tears the
world down, respawns and reloads it, replays every group's completed steps, and sends again
the steps that were in flight when it broke, in their order; the receiving lane then carries
on. Every group in flight survives, with the same KV caches bit for bit.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import torch

from noodle.errors import ExecutorError
from noodle.executors.batching import make_pipeline
from noodle.executors.kvbudget import kv_capacity_tokens, max_positions, stage_layers
from noodle.executors.messages import StageInput, StageOutput
from noodle.executors.netreport import FailoverEvent
from noodle.executors.ring.transport import NO_REPLACEMENT, Ring
from noodle.executors.ring.wire import Flag, Op, step_flags
from noodle.executors.scheduler import Pipeline

if TYPE_CHECKING:
    from noodle.executors.ring.coordinator import TorchRpcExecutor

__all__ = ["RingDriver", "SendLane", "RecvLane", "ring_pipeline"]


class RingDriver:
    """Sends and receives the ring's messages for the two lanes; restarts a broken ring."""

    def __init__(self, ex: TorchRpcExecutor) -> None:
        self.ex = ex
        self.lock = threading.RLock()
        self.epoch = 0
        self._ids: dict[str, int] = {}
        self._next_id = itertools.count(1_000_000)
        self._outstanding: deque[tuple[str, StageInput | None]] = deque()  # sent, reply not yet received
        self._history: dict[str, list[StageInput]] = {}  # steps whose replies came back, for replay
        self.restarts_left = ex.restarts if ex.spawn else 0
        self.steps = 0

    # -- sending ---------------------------------------------------------------------------------
    def _send_raw(self, session: str, msg: StageInput | None, ring: Ring | None = None) -> None:
        ring = ring or self.ex._live_ring()
        if msg is None:
            ring.send(ring.header(Op.END, session=self._ids[session]), 1)
        else:
            ring.send_data(ring.header(Op.STEP, session=self._ids[session], flags=step_flags(msg)), msg.data,
                           msg.attention_mask, 1)  # fmt: skip

    def send(self, session: str, msg: StageInput | None) -> None:
        """Put a step (``None``: the session's end) into the ring.

        The lock covers bookkeeping only, never a blocking send: rank 1 may wait for the
        coordinator to receive an earlier reply before it takes this message.
        """
        with self.lock:
            if msg is not None and msg.prefill:
                self._ids[session] = next(self._next_id)
                self._history[session] = []
            if session not in self._ids:
                if msg is None:
                    return
                raise ExecutorError(f"torchrpc: unknown session {session!r}; start it with a prefill step")
            self._outstanding.append((session, msg))
            self.steps += 1
            epoch, ring = self.epoch, self.ex._live_ring()
        try:
            self._send_raw(session, msg, ring)
        except RuntimeError as exc:
            with self.lock:
                self._restart(f"sending to rank 1: {exc}", epoch)  # resends this message too

    # -- receiving -------------------------------------------------------------------------------
    def recv(self, session: str, *, end: bool) -> torch.Tensor | None:
        """The reply to the oldest message in flight (it must belong to ``session``)."""
        while True:
            with self.lock:  # not while a restart is under way
                epoch, ring = self.epoch, self.ex._live_ring()
            try:
                head, got = ring.recv(self.ex.world - 1, self.ex.policy.step_timeout_s)
                if head.op == Op.ERROR:
                    err = self.ex._remote_error(head)
                    if not isinstance(err, ExecutorError):  # a lost rank, reported by its neighbour
                        raise RuntimeError(str(err))
                    self._pop(session, None)
                    raise err
                data = None if head.op == Op.END else ring.recv_data(head, got, self.ex.world - 1, self.ex.policy.step_timeout_s)[0]
            except RuntimeError as exc:
                with self.lock:
                    if self.epoch == epoch:
                        self._restart(f"waiting for a step to come round: {exc}", epoch)
                continue
            with self.lock:
                self._pop(session, None if end else data)
            if data is not None and not head.flags & Flag.LOGITS:
                raise ExecutorError(f"torchrpc: the ring returned hidden states, not logits, for {session}")
            return data

    def _pop(self, session: str, data: torch.Tensor | None) -> None:
        want, msg = self._outstanding.popleft()
        if want != session:
            raise ExecutorError(f"torchrpc: replies out of order (expected {want}, the pipeline waits for {session})")
        if msg is None:
            self._history.pop(session, None)
            self._ids.pop(session, None)
        elif data is not None and session in self._history:
            self._history[session].append(msg)

    # -- failures --------------------------------------------------------------------------------
    def _restart(self, reason: str, epoch: int) -> None:
        if epoch != self.epoch:
            return
        ex = self.ex
        t0 = time.perf_counter()
        lost = ex._lost_ranks() if ex.spawn else "a rank died, hung or was cut off"
        ex._kill_world()
        if self.restarts_left <= 0:
            raise ExecutorError(f"torchrpc: the ring broke ({reason}); {lost}. {NO_REPLACEMENT}")
        self.restarts_left -= 1
        ex._log(f"noodle: torchrpc lost the ring ({reason}; {lost}); respawning {ex.world - 1} workers")
        replayed = 0
        try:
            ex._start()
            for session, steps in self._history.items():
                for msg in steps:
                    self._send_raw(session, msg)
                    ring = ex._live_ring()
                    head, got = ring.recv(ex.world - 1, ex.policy.step_timeout_s)
                    if head.op == Op.ERROR:
                        raise ExecutorError(f"torchrpc: replaying {session} failed: {ex._remote_error(head)}")
                    ring.recv_data(head, got, ex.world - 1, ex.policy.step_timeout_s)
                    replayed += 1
            for session, msg in self._outstanding:
                self._send_raw(session, msg)
        except RuntimeError as exc:
            ex._kill_world()
            raise ExecutorError(f"torchrpc: the respawned ring broke too ({exc})") from None
        self.epoch += 1
        detail = (f"respawned {ex.world - 1} workers, replayed {replayed} steps of {len(self._history)} group(s) "
                  f"and resent {len(self._outstanding)} in flight")  # fmt: skip
        ex.failovers.append(FailoverEvent(step=self.steps, node=lost, reason=reason, action="restarted", detail=detail,
                                          replayed_steps=replayed, seconds=time.perf_counter() - t0))  # fmt: skip
        ex._log(f"noodle: failover: {detail} ({time.perf_counter() - t0:.2f} s)")


class SendLane:
    """Lane 0: sends a group's step into the ring and hands the pipeline's next lane a receipt."""

    def __init__(self, driver: RingDriver, name: str) -> None:
        self.driver, self.name = driver, name

    def run(self, msg: StageInput) -> StageOutput:
        self.driver.send(msg.session, msg)
        return StageOutput(msg.session, torch.empty(msg.batch_size, 0, 0), msg.attention_mask, is_logits=False)

    def end(self, session: str) -> None:
        self.driver.send(session, None)


class RecvLane:
    """Lane 1: receives the replies, in the order the steps went out."""

    ordered = True  # the pipeline must hand it steps in the order lane 0 sent them

    def __init__(self, driver: RingDriver, name: str) -> None:
        self.driver, self.name = driver, name

    def run(self, msg: StageInput) -> StageOutput:
        data = self.driver.recv(msg.session, end=False)
        if data is None:
            raise ExecutorError(f"torchrpc: an end marker came back in place of a step of {msg.session}")
        return StageOutput(msg.session, data.cpu(), msg.attention_mask, is_logits=True)

    def end(self, session: str) -> None:
        self.driver.recv(session, end=True)


def ring_pipeline(ex: TorchRpcExecutor, *, concurrency: int, micro_batch: int, prefill_chunk: int, max_queue: int,
                  batching: str = "groups", max_batch_tokens: int = 256) -> Pipeline:
    """A pipeline over ``ex``'s ring (see the module docstring)."""
    ex._live_ring()
    driver = RingDriver(ex)
    stages = ex.plan.stages
    caps = kv_capacity_tokens(ex.plan, ex.config, ex.param_bytes, [stage_layers(s.layers) for s in stages])
    lanes = [SendLane(driver, f"ring -> {stages[0].node}"), RecvLane(driver, f"{stages[-1].node} -> ring")]
    return make_pipeline(
        lanes, batching=batching, max_batch_tokens=max_batch_tokens, eos_token_id=ex.eos_token_id, pad_token_id=ex.pad_token_id, concurrency=concurrency,
        micro_batch=micro_batch, prefill_chunk=prefill_chunk, max_queue=max_queue, kv_capacity_tokens=caps,
        max_context=max_positions(ex.config), failovers=lambda: list(ex.failovers),
    )  # fmt: skip
