"""How the ``grpc`` coordinator brings a failed stage back: retry the worker, move to a spare, or merge.

A call that loses its connection or has no reply within its step timeout is retried with
backoff after a health check; a node that stays gone has its stage moved to the next
``--spare`` worker, or, without one, merged into a neighbour that has room
(:func:`~noodle.executors.failover.merge_stage`). Each recovery replays the stage's recorded
inputs so its KV cache is rebuilt bit for bit, and is logged as a
:class:`~noodle.executors.netreport.FailoverEvent`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from noodle.errors import ExecutorError
from noodle.executors.failover import RetryPolicy, merge_stage, merge_target
from noodle.executors.grpc import stage_service_pb2 as pb
from noodle.executors.grpc.client import ForwardStream, StageLost, WorkerClient, WorkerGone
from noodle.executors.netreport import FailoverEvent
from noodle.plandoc import PlanDoc, StageDoc

__all__ = ["Recovery"]


@dataclass
class _Slot:
    """One stage of the running pipeline and the worker holding it."""

    doc: StageDoc
    client: WorkerClient
    stage_id: str = ""
    param_bytes: int = 0
    session: str = ""
    stream: ForwardStream | None = None
    history: list[pb.ForwardRequest] = field(default_factory=list)  # this generation's requests, for replay
    kv: int = 0

    @property
    def where(self) -> str:
        return f"{self.doc.node} ({self.client.address})"

    @property
    def peer(self) -> str:
        return f"{self.doc.node}@{self.client.address}"


class Recovery:
    """Failover for :class:`~noodle.executors.grpc.coordinator.GrpcExecutor` (which provides the sessions)."""

    plan: PlanDoc
    policy: RetryPolicy
    spares: list[str]
    failovers: list[FailoverEvent]
    _slots: list[_Slot]
    _log: Callable[[str], None]

    def _client(self, address: str) -> WorkerClient:
        raise NotImplementedError

    def _load(self, slot: _Slot) -> None:
        raise NotImplementedError

    def _open_session(self, slot: _Slot, replay: bool) -> None:
        raise NotImplementedError

    def _end_session(self, slot: _Slot) -> None:
        raise NotImplementedError

    def _recover(self, i: int, x: pb.ForwardRequest, exc: Exception, step: int) -> tuple[int, pb.ForwardRequest]:
        """Bring stage ``i`` back (retry, spare, merge); returns where to resume and with what input."""
        slot = self._slots[i]
        t0 = time.perf_counter()
        reason = str(exc)
        self._log(f"noodle: {slot.where} failed at step {step}: {reason}")
        for delay in self.policy.delays():
            time.sleep(delay)
            if slot.client.alive(self.policy.health_timeout_s):
                try:
                    if isinstance(exc, StageLost):
                        self._load(slot)
                    self._open_session(slot, replay=True)
                except (WorkerGone, ExecutorError) as again:
                    reason = str(again)
                    continue
                self._event(step, slot, reason, "retried", f"same worker {slot.client.address}", t0)
                return i, x
        while self.spares:
            addr = self.spares.pop(0)
            client = self._client(addr)
            try:
                client.sync_clock(self.policy.health_timeout_s)
                dead_addr = slot.client.address
                slot.client = client
                self._load(slot)
                self._open_session(slot, replay=True)
            except WorkerGone as again:
                self._log(f"noodle: spare {addr} is not usable ({again})")
                continue
            self._event(step, slot, reason, "spare", f"stage [{slot.doc.start}, {slot.doc.end}) moved from {dead_addr} to spare {addr}", t0)
            return i, x
        return self._merge(i, x, step, reason, t0)

    def _merge(self, i: int, x: pb.ForwardRequest, step: int, reason: str, t0: float) -> tuple[int, pb.ForwardRequest]:
        j = merge_target(self.plan, i)
        dead, nb = self._slots[i], self._slots[j]
        new_plan = merge_stage(self.plan, i, j)
        lo = min(i, j)
        merged = _Slot(doc=new_plan.stages[lo], client=nb.client)
        if j == i + 1:
            merged.history, resume, x_next = list(dead.history), lo, x
        else:
            merged.history, resume, x_next = list(nb.history[:-1]), lo, nb.history[-1]
        old_stage = nb.stage_id
        if dead.stream is not None:  # its worker is gone: nothing to close there
            dead.stream.close()
        try:
            self._end_session(nb)
            self._load(merged)
            self._open_session(merged, replay=True)
            if old_stage != merged.stage_id:
                nb.client.unary("UnloadStage", pb.UnloadStageRequest(stage_id=old_stage), self.policy.health_timeout_s, nb.doc.node)
        except WorkerGone as again:
            raise ExecutorError(
                f"failover: {dead.where} is gone and merging its units into {nb.where} failed too ({again})"
            ) from None
        self._slots[lo : lo + 2] = [merged]
        self.plan = new_plan
        self._event(step, dead, reason, "merged",
                    f"units [{dead.doc.start}, {dead.doc.end}) merged into {nb.doc.node}: now [{merged.doc.start}, {merged.doc.end})", t0)  # fmt: skip
        return resume, x_next

    def _event(self, step: int, slot: _Slot, reason: str, action: str, detail: str, t0: float) -> None:
        ev = FailoverEvent(step=step, node=slot.doc.node, reason=reason, action=action, detail=detail,
                           replayed_steps=len(slot.history), seconds=time.perf_counter() - t0)  # fmt: skip
        self.failovers.append(ev)
        self._log(f"noodle: failover at step {step}: {action}: {detail} ({ev.seconds:.2f} s)")
