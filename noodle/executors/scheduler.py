"""The pipelined engine every executor shares: many sequences in flight, every stage busy.

A :class:`Pipeline` owns one thread per stage *lane* (a stage in this process, or the
connection to a remote one) and one scheduler thread. Requests wait in a bounded queue;
the scheduler admits them in *groups* (up to ``micro_batch`` requests, left-padded into
one batch, one KV-cache session per stage) while fewer than ``concurrency`` groups are in
flight and the stages' KV budget holds their context. A group's step walks the lanes in
order; while lane ``k`` runs group ``g``, lane ``k+1`` runs group ``g-1``. When the last
lane returns a group's logits, the scheduler samples each row with its request's own
seeded sampler and sends the group's next step, or ends the group: an end marker walks
the lanes behind its last step and frees its KV cache on each stage at once.

Chunked prefill cuts a prompt into ``prefill_chunk``-token pieces sent back to back, so
lane 1 starts chunk 2 while lane 2 runs chunk 1 and other groups' decode steps interleave.

Tokens stay exact: a group of one request is the same computation as ``generate`` on
that prompt alone, whatever else is in flight (each lane keeps one KV cache per session).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from noodle.errors import ExecutorError, SpecError
from noodle.executors.generation import Sampler, Sampling, left_pad
from noodle.executors.messages import StageInput
from noodle.executors.requests import (
    Completion,
    Lane,
    LaneStats,
    PipelineStats,
    QueueFull,
    RequestHandle,
    _End,
    _Group,
    _Inbox,
    _LaneMeter,
    _Request,
    _Step,
)
from noodle.graph.costmodel import pipeline_tokens_per_s as predicted_tokens_per_s

__all__ = [
    "Lane",
    "Pipeline",
    "RequestHandle",
    "Completion",
    "LaneStats",
    "PipelineStats",
    "QueueFull",
    "predicted_tokens_per_s",
]

log = logging.getLogger(__name__)
_ids = itertools.count()


class Pipeline:
    """Serves many requests at once over ``lanes`` (see the module docstring).

    Args:
        lanes: the stages in pipeline order.
        eos_token_id, pad_token_id: as ``generate`` uses them.
        concurrency: groups in flight at most (>= 1).
        micro_batch: requests per group (>= 1; 1 keeps every sequence exact on its own).
        prefill_chunk: tokens per prefill chunk (0: the whole prompt in one step).
        max_queue: requests that may wait for admission; more raise :class:`QueueFull`.
        kv_capacity_tokens: per lane, the KV-cache tokens its memory holds beside the weights
            (``None``: unbounded); admission keeps the sum of in-flight contexts within it.
        max_context: longest prompt + new tokens a request may ask for (``None``: unchecked).
        hop_bytes: how many bytes a lane's output costs on the wire (for the stats).
        planned_ms: per lane, the plan's step time, shown next to the measured one.
        failovers: returns the executor's failover events so far (shown in :meth:`stats`).
    """

    def __init__(
        self,
        lanes: Sequence[Lane],
        *,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int,
        concurrency: int = 1,
        micro_batch: int = 1,
        prefill_chunk: int = 0,
        max_queue: int = 256,
        kv_capacity_tokens: Sequence[int | None] | None = None,
        max_context: int | None = None,
        planned_ms: Sequence[float | None] | None = None,
        failovers: Callable[[], Sequence[object]] | None = None,
    ) -> None:
        if not lanes:
            raise ExecutorError("pipeline: no stages")
        for name, value, low in (("concurrency", concurrency, 1), ("micro_batch", micro_batch, 1),
                                 ("prefill_chunk", prefill_chunk, 0), ("max_queue", max_queue, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SpecError(f"--{name.replace('_', '-')}: must be an integer >= {low}, got {value!r}")
        self.lanes = list(lanes)
        self.concurrency = concurrency
        self.micro_batch = micro_batch
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.max_context = max_context
        self._failovers = failovers
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        self._eos = frozenset(int(e) for e in eos)
        self.pad_token_id = pad_token_id
        caps = list(kv_capacity_tokens) if kv_capacity_tokens is not None else []
        self._kv_cap = min((c for c in caps if c is not None), default=None)
        planned = list(planned_ms) if planned_ms is not None else [None] * len(self.lanes)
        self._meters = [_LaneMeter(lane.name, p) for lane, p in zip(self.lanes, planned)]
        # Decode steps overtake queued prefill chunks at every lane, but a lane whose inputs must be
        # taken in arrival order (the torchrpc ring's receiving lane) says so with ``ordered = True``.
        self._queues: list[Any] = [queue.Queue() if getattr(lane, "ordered", False) else _Inbox() for lane in self.lanes]
        self._events: queue.Queue[tuple] = queue.Queue()
        self._waiting: deque[_Request] = deque()
        self._groups: dict[int, _Group] = {}
        self._by_rid: dict[str, _Request] = {}
        self._reserved = 0
        self._peak = 0
        self._completed = 0
        self._tokens = 0
        self._token_times: deque[float] = deque(maxlen=8192)
        self._lock = threading.Lock()  # guards _waiting length for submit, and the counters read by stats
        self._threads: list[threading.Thread] = []
        self._accepting = True  # requests submitted before start() wait and are admitted together
        self._stopped = threading.Event()
        self._gids = itertools.count()
        self.t_start = 0.0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Pipeline:
        if self._threads:
            return self
        if self._stopped.is_set():
            raise ExecutorError("pipeline: closed; make a new one")
        self.t_start = time.monotonic()
        for k in range(len(self.lanes)):
            t = threading.Thread(target=self._lane_loop, args=(k,), name=f"noodle-lane-{k}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._schedule_loop, name="noodle-scheduler", daemon=True)
        t.start()
        self._threads.append(t)
        self._events.put(("submit", None))
        return self

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish for up to ``timeout_s``, cancel the rest, join."""
        with self._lock:
            self._accepting = False
        if not self._threads:
            self._fail_everything("the pipeline was closed before it started")
            self._stopped.set()
            return
        deadline = time.monotonic() + max(0.0, timeout_s)
        while time.monotonic() < deadline:
            with self._lock:
                busy = bool(self._by_rid)
            if not busy:
                break
            time.sleep(0.01)
        self._events.put(("close", None))
        self._stopped.wait(timeout=max(1.0, timeout_s))
        for t in self._threads:
            t.join(timeout=5.0)
        self._threads = []

    @property
    def batching(self) -> str:
        """The engine's mode (:func:`noodle.executors.batching.make_pipeline`): fixed groups here."""
        return "groups"

    @property
    def accepting(self) -> bool:
        return self._accepting

    # -- requests --------------------------------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        *,
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        on_token: Callable[[int], None] | None = None,
        on_done: Callable[[Completion], None] | None = None,
    ) -> RequestHandle:
        """Queue one request; see :class:`RequestHandle`. Raises :class:`QueueFull` or ``SpecError``."""
        if not self._accepting:
            raise ExecutorError("pipeline: not accepting requests (shutting down)")
        ids = [int(t) for t in prompt]
        if not ids:
            raise SpecError("prompt: needs at least one token")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise SpecError(f"max_new_tokens: must be an integer >= 1, got {max_new_tokens!r}")
        need = len(ids) + max_new_tokens
        if self.max_context is not None and need > self.max_context:
            raise SpecError(
                f"prompt: {len(ids)} tokens + {max_new_tokens} new = {need} exceed the context of "
                f"{self.max_context} tokens this pipeline serves"
            )
        if self._kv_cap is not None and need > self._kv_cap:
            raise SpecError(
                f"prompt: {need} tokens of context need more KV cache than a stage holds "
                f"({self._kv_cap} tokens beside its weights)"
            )
        rid = f"req-{next(_ids)}"
        handle = RequestHandle(self, rid)
        req = _Request(rid, ids, max_new_tokens, Sampler(sampling), on_token, on_done, handle, time.monotonic())
        with self._lock:
            if not self._accepting:
                raise ExecutorError("pipeline: not accepting requests (shutting down)")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"queue full: {len(self._waiting)} requests wait already (max_queue {self.max_queue})")
            self._waiting.append(req)
            self._by_rid[rid] = req
        self._events.put(("submit", None))
        return handle

    def stats(self, window_s: float = 10.0) -> PipelineStats:
        """Queue, in-flight and per-lane figures over the last ``window_s`` seconds."""
        now = time.monotonic()
        span = min(window_s, now - self.t_start) if self.t_start else 0.0
        with self._lock:
            recent = sum(1 for t in self._token_times if t > now - span) if span > 0 else 0
            in_flight = sum(len(g.requests) for g in self._groups.values())
            return PipelineStats(
                queue_depth=len(self._waiting),
                in_flight=in_flight,
                groups_in_flight=len(self._groups),
                completed=self._completed,
                tokens_generated=self._tokens,
                tokens_per_s=recent / span if span > 0 else 0.0,
                stages=tuple(m.snapshot(span) for m in self._meters),
                failovers=tuple(self._failovers()) if self._failovers is not None else (),
                peak_in_flight=self._peak,
                kv_capacity_tokens=self._kv_cap,
                kv_reserved_tokens=self._reserved,
            )

    # -- lane threads ----------------------------------------------------------------------------
    def _lane_loop(self, k: int) -> None:
        lane, inbox, meter = self.lanes[k], self._queues[k], self._meters[k]
        last = k == len(self.lanes) - 1
        while True:
            item = inbox.get()
            if item is None:  # behind every end marker: the lanes stop in order
                if not last:
                    self._queues[k + 1].put(None)
                return
            if isinstance(item, _End):
                try:
                    lane.end(item.session)
                except Exception as exc:  # noqa: BLE001 - a lane that cannot free a session must not stop the others
                    log.warning("%s: could not end session %s: %s", lane.name, item.session, exc)
                if not last:
                    self._queues[k + 1].put(item)
                continue
            t0 = time.monotonic()
            try:
                out = lane.run(item.msg)
            except Exception as exc:  # noqa: BLE001 - reported to the group's requests, the lane goes on
                self._events.put(("error", (item.group, f"{lane.name}: {exc}")))
                continue
            t1 = time.monotonic()
            try:
                meter.busy.append((t0, t1))
                meter.step_ms.append((t1 - t0) * 1e3)
                meter.hop_ms.append(float(getattr(lane, "last_hop_ms", 0.0)))
                meter.bytes_out += out.nbytes()
                meter.steps += 1
                if last:
                    self._events.put(("result", (item.group, out, item.final)))
                else:
                    nxt = out.next_input(prefill=item.msg.prefill, all_logits=item.msg.all_logits)
                    self._queues[k + 1].put(_Step(item.group, nxt, item.final, item.decode))
            except Exception as exc:  # noqa: BLE001 - a malformed output fails its group, not the lane
                self._events.put(("error", (item.group, f"{lane.name}: bad output: {exc}")))

    # -- scheduler thread ------------------------------------------------------------------------
    def _schedule_loop(self) -> None:
        try:
            while True:
                kind, payload = self._events.get()
                if kind == "close":
                    self._shutdown()
                    return
                if kind == "result":
                    gid, out, final = payload
                    if final:
                        self._on_logits(gid, out.data[:, -1, :].cpu())
                elif kind == "error":
                    gid, text = payload
                    self._fail_group(gid, text)
                elif kind == "cancel":
                    self._cancel(payload)
                self._admit()
        except Exception as exc:  # noqa: BLE001 - never leave callers waiting on a dead scheduler
            log.exception("pipeline scheduler failed")
            with self._lock:
                self._accepting = False  # a dead engine takes no more requests (and the server stops being ready)
            self._fail_everything(f"scheduler failed: {exc}")
            self._queues[0].put(None)
            self._stopped.set()

    def _admit(self) -> None:
        while self._waiting and len(self._groups) < self.concurrency:
            with self._lock:
                batch: list[_Request] = []
                while self._waiting and len(batch) < self.micro_batch:
                    cand = self._waiting[0]
                    width = max([len(r.prompt) for r in batch] + [len(cand.prompt)])
                    longest = max([r.max_new_tokens for r in batch] + [cand.max_new_tokens])
                    need = (len(batch) + 1) * (width + longest)
                    if self._kv_cap is not None and self._reserved + need > self._kv_cap:
                        break  # waits until a group ends and frees its KV
                    batch.append(self._waiting.popleft())
                if not batch:
                    return
                width = max(len(r.prompt) for r in batch)
                longest = max(r.max_new_tokens for r in batch)
                gid = next(self._gids)
                ids, mask = left_pad([r.prompt for r in batch], self.pad_token_id)
                group = _Group(gid, f"g{gid}-{batch[0].rid}", batch, mask, len(batch) * (width + longest))
                self._reserved += group.reserved_tokens
                self._groups[gid] = group
                self._peak = max(self._peak, sum(len(g.requests) for g in self._groups.values()))
            now = time.monotonic()
            for r in batch:
                r.t_admit = now
            self._send_prefill(group, ids)

    def _send_prefill(self, group: _Group, ids: torch.Tensor) -> None:
        width = ids.shape[1]
        chunk = self.prefill_chunk or width
        starts = list(range(0, width, chunk))
        for n, lo in enumerate(starts):
            hi = min(width, lo + chunk)
            part_mask = None if group.mask is None else group.mask[:, lo:hi]
            msg = StageInput(group.session, ids[:, lo:hi], part_mask, prefill=(n == 0))
            self._queues[0].put(_Step(group.gid, msg, final=(n == len(starts) - 1)))

    def _on_logits(self, gid: int, logits: torch.Tensor) -> None:
        group = self._groups.get(gid)
        if group is None:
            return
        group.steps += 1
        now = time.monotonic()
        nxt = torch.full((len(group.requests),), self.pad_token_id, dtype=torch.long)
        for row, req in enumerate(group.requests):
            if req.finish is not None:
                continue
            token = int(req.sampler(logits[row : row + 1])[0])
            nxt[row] = token
            req.tokens.append(token)
            req.stamps.append(now)
            with self._lock:
                self._tokens += 1
                self._token_times.append(now)
            self._call(req.on_token, token, req)
            if token in self._eos:
                req.finish = "stop"
            elif len(req.tokens) >= req.max_new_tokens:
                req.finish = "length"
        if all(r.finish is not None for r in group.requests):
            self._end_group(group)
            return
        step_mask = None if group.mask is None else torch.ones(len(group.requests), 1, dtype=torch.long)
        msg = StageInput(group.session, nxt.unsqueeze(-1), step_mask, prefill=False)
        self._queues[0].put(_Step(gid, msg, final=True, decode=True))

    def _cancel(self, rid: str) -> None:
        with self._lock:
            req = self._by_rid.get(rid)
            if req is None or req.finish is not None:
                return
            if req in self._waiting:
                self._waiting.remove(req)
                req.finish = "cancelled"
                queued = True
            else:
                queued = False
        if not queued:
            req.finish = "cancelled"  # its row is padded from the next step on; the group frees its KV when it ends
        self._finish(req)

    def _fail_group(self, gid: int, text: str) -> None:
        group = self._groups.get(gid)
        if group is None:
            return
        for req in group.requests:
            if req.finish is None:
                req.finish, req.error = "error", text
        self._end_group(group)

    def _end_group(self, group: _Group) -> None:
        with self._lock:
            self._groups.pop(group.gid, None)
            self._reserved -= group.reserved_tokens
        self._queues[0].put(_End(group.session))
        for req in group.requests:
            self._finish(req)

    def _finish(self, req: _Request) -> None:
        if req.notified:
            return
        req.notified = True
        stamps = req.stamps
        comp = Completion(
            request_id=req.rid,
            prompt_tokens=len(req.prompt),
            tokens=list(req.tokens),
            finish_reason=req.finish or "error",
            error=req.error,
            queued_s=(req.t_admit or time.monotonic()) - req.t_submit,
            ttft_s=(stamps[0] - req.t_submit) if stamps else None,
            itl_s=tuple(b - a for a, b in zip(stamps, stamps[1:])),
        )
        with self._lock:
            self._by_rid.pop(req.rid, None)
            self._completed += 1
        req.handle._completion = comp
        req.handle._done.set()
        self._call(req.on_done, comp, req)

    @staticmethod
    def _call(fn: Callable | None, arg: object, req: _Request) -> None:
        if fn is None:
            return
        try:
            fn(arg)
        except Exception as exc:  # noqa: BLE001 - a caller's callback must not kill the engine
            log.warning("request %s: callback failed: %s", req.rid, exc)

    def _cancel_waiting(self, text: str) -> None:
        """Cancel every request still waiting for admission."""
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        for req in waiting:
            req.finish, req.error = "cancelled", text
            self._finish(req)

    def _fail_everything(self, text: str) -> None:
        self._cancel_waiting(text)
        for group in list(self._groups.values()):
            for req in group.requests:
                if req.finish is None:
                    req.finish, req.error = "cancelled", text
            self._end_group(group)

    def _shutdown(self) -> None:
        self._fail_everything("the server is shutting down")
        self._queues[0].put(None)
        self._stopped.set()
