"""The grpc executor's stages as pipeline lanes: one stream per stage, one worker session per group.

Each lane is driven by one pipeline thread, so while the coordinator waits on stage
``k``'s reply for one group, it waits on stage ``k+1``'s for another: the workers
compute at once. A lane keeps, per group in flight, the requests it has sent (for
replay). When its worker stops answering, the lane retries the same worker, then moves
its stage to a ``--spare`` worker, then to the worker of a neighbour stage that has room
(as an extra stage there): in every case it recreates the session of *every* group in
flight on it and replays their recorded inputs (same tensors, same order, so the same
KV caches bit for bit), then carries on with the step that failed. No group is lost.
A worker that answers ``NOT_FOUND`` (restarted, or reaped a session) has lost the stage:
it is loaded there again before the sessions are rebuilt. Step deadlines are the
executor's (:meth:`~noodle.executors.grpc.coordinator.GrpcExecutor.step_timeout_s`).

Packed steps (continuous batching, ``--batching continuous|exact``): a step of many sequences
crosses to the worker as one ``ForwardRequest`` with ``seqs``; the lane keeps one worker session
for all of them (each sequence's KV namespaced under it on the worker) and ``end(seq)`` frees one
sequence there (``CloseSession`` with ``seqs``). For replay the lane records per sequence its
chunks' slices of the packed inputs (:class:`~noodle.executors.grpc.seqlog.SeqLog`); a rebuild
replays them on the new session before the failed step is resent. After a replay, exact mode's
tokens are bitwise those of a run without failure; continuous mode's KV equals the lost one up to
floating-point reassociation (see :mod:`~noodle.executors.grpc.seqlog`). A worker whose health
shows no ``max_seqs`` (an older noodle) does not take packed steps: ``auto`` batching then keeps
groups, and such a spare is passed over while packed sequences are in flight.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING

from noodle.errors import ExecutorError
from noodle.executors.batching import make_pipeline, resolve_batching
from noodle.executors.failover import merge_target
from noodle.executors.grpc import stage_service_pb2 as pb
from noodle.executors.grpc.client import ForwardStream, StageLost, WorkerClient, WorkerGone
from noodle.executors.grpc.edge import chunks_to_proto
from noodle.executors.grpc.seqlog import SeqLog
from noodle.executors.grpc.wire import from_proto, to_proto
from noodle.executors.kvbudget import kv_capacity_tokens, max_positions, stage_layers
from noodle.executors.messages import StageInput, StageOutput
from noodle.executors.netreport import FailoverEvent

if TYPE_CHECKING:
    from noodle.executors.grpc.coordinator import GrpcExecutor, _Slot
    from noodle.executors.scheduler import Pipeline

__all__ = ["GrpcLane", "grpc_pipeline"]

OBSERVED_FACTOR = 4.0  # an honest worker's reported compute is well within this of the coordinator's view
_PACKED = "packed"  # the pipeline-side name of the lane's one worker session for packed steps


class GrpcLane:
    """Stage ``index`` of ``executor`` as a :class:`~noodle.executors.scheduler.Lane`."""

    packed_steps = True  # unless its worker's health says otherwise (grpc_pipeline sets it per lane)

    def __init__(self, executor: GrpcExecutor, index: int, health: pb.HealthReply | None = None) -> None:
        self.ex = executor
        self.index = index
        slot: _Slot = executor._slots[index]
        self.doc = slot.doc
        self.name = slot.doc.node
        self.client: WorkerClient = slot.client
        self.stage_id = slot.stage_id
        self._stream: ForwardStream | None = None
        self._sessions: dict[str, str] = {}  # pipeline session -> worker session
        self._history: dict[str, list[pb.ForwardRequest]] = {}
        self._seqs = SeqLog()  # packed steps: each sequence's chunks, for replay
        self.limits = (0, 0)  # the worker's max_seqs, max_step_tokens (0: it takes no packed steps)
        if health is not None:
            self._take_limits(health)
        self._steps = 0
        self.last_hop_ms = 0.0
        # recent decode steps: (their compute time in ms, see _judged; the sequences the step carried)
        self.decode_log: deque[tuple[float, int]] = deque(maxlen=512)
        self.decode_steps = 0

    @property
    def where(self) -> str:
        return f"{self.name} ({self.client.address})"

    # -- the Lane protocol -------------------------------------------------------------------------
    def run(self, msg: StageInput) -> StageOutput:
        if msg.seqs:
            return self._run_packed(msg)
        req = pb.ForwardRequest(prefill=msg.prefill, all_logits=msg.all_logits)
        req.data.CopyFrom(to_proto(msg.data))
        if msg.attention_mask is not None:
            req.attention_mask.CopyFrom(to_proto(msg.attention_mask))
        if msg.prefill:
            self._history[msg.session] = []
        elif msg.session not in self._history:
            raise ExecutorError(f"{self.where}: unknown session {msg.session!r}; start it with a prefill step")
        self._steps += 1
        while True:
            try:
                if msg.session not in self._sessions:
                    self._create(msg.session)
                t0 = time.perf_counter()
                reply = self._send(msg.session, req)
                break
            except WorkerGone as exc:
                self._recover(exc)
        self._history[msg.session].append(req)
        if not msg.prefill:
            self._decoded(reply, (time.perf_counter() - t0) * 1e3, int(msg.data.shape[0]))
        data = from_proto(reply.data, field=f"{self.where}: reply data", max_bytes=self.ex.max_message_bytes)
        return StageOutput(msg.session, data, msg.attention_mask, is_logits=reply.is_logits)

    def _run_packed(self, msg: StageInput) -> StageOutput:
        self._seqs.check(msg, self.where)
        req = pb.ForwardRequest(exact=msg.exact)
        req.data.CopyFrom(to_proto(msg.data))
        req.seqs.extend(chunks_to_proto(msg.seqs))
        self._steps += 1
        while True:
            try:
                if _PACKED not in self._sessions:
                    self._create(_PACKED)
                t0 = time.perf_counter()
                reply = self._send(_PACKED, req)
                break
            except WorkerGone as exc:
                self._recover(exc)
        self._seqs.record(msg)
        if all(c.tokens == 1 and not c.start for c in msg.seqs):  # a decode step (no prompt chunk): the drift figure
            wall_ms = (time.perf_counter() - t0) * 1e3
            if msg.exact:  # each sequence ran alone: a one-sequence step's time, on average
                self._decoded(reply, wall_ms, 1, len(msg.seqs))
            else:
                self._decoded(reply, wall_ms, len(msg.seqs))
        data = from_proto(reply.data, field=f"{self.where}: reply data", max_bytes=self.ex.max_message_bytes)
        return StageOutput(msg.session, data, None, is_logits=reply.is_logits, seqs=msg.seqs, exact=msg.exact)

    def _decoded(self, reply: pb.ForwardReply, wall_ms: float, rows: int, runs: int = 1) -> None:
        """Record a decode step: its compute time (:meth:`_judged`; per run when it ran ``runs`` times) and its batch."""
        self.decode_log.append((self._judged(reply, wall_ms) / runs, rows))
        self.decode_steps += 1

    def end(self, session: str) -> None:
        if self._seqs.end(session):  # one sequence of the packed steps: free its KV there
            wsid = self._sessions.get(_PACKED)
            if wsid is None:
                return
            if self._seqs:
                req = pb.CloseSessionRequest(session=wsid, seqs=[session])
            else:  # the last one: close the session too, so an idle pipeline leaves nothing for the reaper
                req = pb.CloseSessionRequest(session=self._sessions.pop(_PACKED))
            with contextlib.suppress(WorkerGone, ExecutorError):  # best effort: the session's close frees it too
                self.client.unary("CloseSession", req, self.ex.policy.health_timeout_s, self.where)
            return
        self._history.pop(session, None)
        wsid = self._sessions.pop(session, None)
        if wsid is None:
            return
        with contextlib.suppress(WorkerGone, ExecutorError):  # best effort: a live worker reaps idle sessions
            self.client.unary("CloseSession", pb.CloseSessionRequest(session=wsid), self.ex.policy.health_timeout_s, self.where)

    def close(self) -> None:
        self._seqs.clear()
        for session in list(self._sessions):
            self.end(session)
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    # -- calls -------------------------------------------------------------------------------------
    def _create(self, session: str) -> None:
        wsid = f"{self.ex._uid}-{session}-{self.name}-{next(self.ex._counter)}"
        timeout = self.ex.policy.health_timeout_s * 5
        try:
            self.client.unary("CreateSession", pb.CreateSessionRequest(stage_id=self.stage_id, session=wsid), timeout, self.where)
        except StageLost:  # the worker restarted since the stage was loaded: load it again
            self._load_on(self.client)
            self.client.unary("CreateSession", pb.CreateSessionRequest(stage_id=self.stage_id, session=wsid), timeout, self.where)
        self._sessions[session] = wsid

    def _judged(self, reply: pb.ForwardReply, wall_ms: float) -> float:
        """A decode step's compute for the drift feedback: the worker's own figure, unless what the coordinator
        saw (the step's wall time less the link's ping) is over ``OBSERVED_FACTOR`` x it; then the observed one.

        A worker cannot report itself faster than it answers: its table is corrected by what is observed.
        """
        reported = max(0, reply.t_out_ns - reply.t_in_ns) / 1e6
        observed = wall_ms - (self.client.ping_ms or 0.0)
        return observed if observed > OBSERVED_FACTOR * reported else reported

    def _send(self, session: str, req: pb.ForwardRequest) -> pb.ForwardReply:
        req.session = self._sessions[session]
        req.top1 = False
        if self._stream is None:
            watchdog = self.ex._watchdog
            if watchdog is None:
                raise ExecutorError("grpc executor: not open; use it as a context manager")
            self._stream = ForwardStream(self.client, watchdog, self.where)
        t0 = time.perf_counter()
        reply = self._stream.call(req, self.ex.step_timeout_s(self.doc, req))
        # the hop this stage's call cost: its round trip (transport, (de)serialisation, queueing) minus the worker's compute
        wall_ms = (time.perf_counter() - t0) * 1e3
        self.last_hop_ms = max(0.0, wall_ms - (reply.t_out_ns - reply.t_in_ns) / 1e6)
        return reply

    # -- failures ----------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """Fresh stream and sessions on the current worker, every group's and sequence's inputs replayed."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._sessions = {}
        for session, history in self._history.items():
            self._create(session)
            for req in history:
                self._send(session, req)
        if self._seqs:
            if not self.limits[0]:
                self._take_limits(self.client.health(self.ex.policy.health_timeout_s))
            self._create(_PACKED)
            for step in self._seqs.replay(*self.limits):
                req = pb.ForwardRequest(exact=step.exact)
                req.data.CopyFrom(to_proto(step.data))
                req.seqs.extend(chunks_to_proto(step.seqs))
                self._send(_PACKED, req)

    def _take_limits(self, health: pb.HealthReply) -> None:
        self.limits = (int(health.max_seqs), int(health.max_step_tokens))
        self.packed_steps = self.limits[0] > 0

    def _load_on(self, client: WorkerClient) -> None:
        if client.ping_ms is None:
            client.sync_clock(self.ex.policy.health_timeout_s)
        if self._seqs:  # packed sequences to rebuild there: the worker must take packed steps
            health = client.health(self.ex.policy.health_timeout_s)
            if not health.max_seqs:
                raise ExecutorError(f"{client.address}: this worker takes no packed steps (an older noodle); "
                                    f"{len(self._seqs)} sequence(s) in flight need one that does")  # fmt: skip
            self._take_limits(health)
        req = pb.LoadStageRequest(start=self.doc.start, end=self.doc.end, name=self.name, format=self.doc.format)
        reply = client.unary("LoadStage", req, 600.0, self.name)
        self.client = client
        self.stage_id = reply.stage.stage_id  # type: ignore[attr-defined]

    def _recover(self, exc: Exception) -> None:
        t0 = time.perf_counter()
        reason = str(exc)
        self.ex._log(f"noodle: {self.where} failed at step {self._steps}: {reason}")
        for delay in self.ex.policy.delays():
            time.sleep(delay)
            if self.client.alive(self.ex.policy.health_timeout_s):
                try:
                    if isinstance(exc, StageLost):
                        self._load_on(self.client)
                    self._rebuild()
                except (WorkerGone, ExecutorError) as again:
                    reason = str(again)
                    continue
                return self._event(reason, "retried", f"same worker {self.client.address}", t0)
        dead = self.client.address
        while self.ex.spares:
            addr = self.ex.spares.pop(0)
            try:
                self._load_on(self.ex._client(addr))
                self._rebuild()
            except (WorkerGone, ExecutorError) as again:
                self.ex._log(f"noodle: spare {addr} is not usable ({again})")
                continue
            return self._event(reason, "spare", f"stage [{self.doc.start}, {self.doc.end}) moved from {dead} to spare {addr}", t0)
        if len(self.ex.plan.stages) > 1:
            j = merge_target(self.ex.plan, self.index)
            neighbour = self.ex._slots[j].client
            if neighbour.address != dead:
                try:
                    self._load_on(neighbour)
                    self._rebuild()
                except (WorkerGone, ExecutorError) as again:
                    raise ExecutorError(f"failover: {self.name} at {dead} is gone and moving its stage to "
                                        f"{self.ex._slots[j].doc.node} failed too ({again})") from None  # fmt: skip
                return self._event(reason, "merged", f"stage [{self.doc.start}, {self.doc.end}) moved from {dead} to "
                                   f"{self.ex._slots[j].doc.node}'s worker {neighbour.address}", t0)  # fmt: skip
        raise ExecutorError(f"failover: {self.where} is gone ({reason}) and no spare or neighbour can take its stage")

    def _event(self, reason: str, action: str, detail: str, t0: float) -> None:
        replayed = sum(len(h) for h in self._history.values()) + self._seqs.chunks()
        ev = FailoverEvent(step=self._steps, node=self.name, reason=reason, action=action, detail=detail,
                           replayed_steps=replayed, seconds=time.perf_counter() - t0)  # fmt: skip
        self.ex.failovers.append(ev)
        self.ex._log(f"noodle: failover at step {ev.step}: {action}: {detail}; {len(self._history)} group(s) and "
                     f"{len(self._seqs)} sequence(s) in flight replayed ({replayed} steps, {ev.seconds:.2f} s)")  # fmt: skip


def grpc_pipeline(executor: GrpcExecutor, *, concurrency: int, micro_batch: int, prefill_chunk: int, max_queue: int,
                  batching: str = "groups", max_batch_tokens: int = 256) -> Pipeline:
    """A pipeline over ``executor``'s workers; concurrency is capped by the workers' ``--max-sessions`` (groups)
    or ``--max-seqs`` (packed steps), a packed step's tokens by their ``--max-step-tokens``."""
    if not executor._slots:
        raise ExecutorError("grpc executor: use it as a context manager (`with GrpcExecutor(...) as ex:`)")
    healths: list[pb.HealthReply | None] = []
    for slot in executor._slots:
        try:
            healths.append(slot.client.health(executor.policy.health_timeout_s))
        except (WorkerGone, ExecutorError):
            healths.append(None)  # found again by the lane's first step (retry, spare, merge)
    lanes = [GrpcLane(executor, i, h) for i, h in enumerate(healths)]
    known = [(h, lane) for h, lane in zip(healths, lanes) if h is not None]
    if resolve_batching(batching, lanes) in ("continuous", "exact"):
        cap = min((min(lane.limits) for _, lane in known if lane.packed_steps), default=concurrency)
        flag = "--max-seqs (or --max-step-tokens)"
        budget = min((lane.limits[1] for _, lane in known if lane.packed_steps), default=max_batch_tokens)
        if max_batch_tokens > budget:
            executor._log(f"noodle: --max-batch-tokens {max_batch_tokens} capped at {budget}, the workers' --max-step-tokens")
            max_batch_tokens = budget
    else:
        cap, flag = min((int(h.max_sessions) for h, _ in known), default=concurrency), "--max-sessions"
    if concurrency > cap:
        executor._log(f"noodle: --concurrency {concurrency} capped at {cap}, the workers' {flag}")
        concurrency = cap
    executor._lanes.extend(lanes)
    caps = kv_capacity_tokens(executor.plan, executor.config, [s.param_bytes for s in executor._slots],
                              [stage_layers(s.doc.layers) for s in executor._slots])  # fmt: skip
    return make_pipeline(
        lanes, batching=batching, max_batch_tokens=max_batch_tokens, eos_token_id=executor.eos_token_id,
        pad_token_id=executor.pad_token_id, concurrency=concurrency, micro_batch=micro_batch, prefill_chunk=prefill_chunk,
        max_queue=max_queue, kv_capacity_tokens=caps, max_context=max_positions(executor.config),
        planned_ms=[d.expected_latency_ms for d in executor.plan.stages], failovers=lambda: list(executor.failovers),
    )  # fmt: skip
