"""The engine core every executor shares: lane threads, the request queue, the scheduler thread.

:class:`PipelineCore` owns one thread per stage *lane* (a stage in this process, or the
connection to a remote one) and one scheduler thread that reacts to events (a submit, a
lane's result or error, a cancel, close). What circulates between the lanes, and when a
request is admitted, is the policy of a subclass: fixed groups
(:class:`~noodle.executors.scheduler.Pipeline`) or continuous batches
(:class:`~noodle.executors.batching.BatchingPipeline`).
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
from noodle.executors.generation import Sampler, Sampling
from noodle.executors.requests import (
    Completion,
    Lane,
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

__all__ = ["PipelineCore"]

log = logging.getLogger(__name__)
_ids = itertools.count()


class PipelineCore:
    """Serves many requests at once over ``lanes``; subclasses decide what circulates (module docstring).

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
    def start(self) -> PipelineCore:
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

    def __enter__(self) -> PipelineCore:
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
        """Queue one request; see :class:`RequestHandle`. Raises :class:`QueueFull` or ``SpecError``.

        ``on_token`` gets each token id, a :class:`~noodle.executors.generation.SampledToken` (an ``int``
        with its log probabilities) when ``sampling.logprobs`` is set.
        """
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

    def _shutdown(self) -> None:
        self._fail_everything("the server is shutting down")
        self._queues[0].put(None)
        self._stopped.set()

    # -- the policy a subclass gives -------------------------------------------------------------
    @property
    def batching(self) -> str:
        """The engine's mode (:func:`noodle.executors.batching.make_pipeline`)."""
        raise NotImplementedError

    def _admit(self) -> None:
        """Admit waiting requests while the policy allows, and send their first steps."""
        raise NotImplementedError

    def _on_logits(self, gid: int, logits: torch.Tensor) -> None:
        """Sample the last lane's logits for step ``gid`` and send the next step (or end)."""
        raise NotImplementedError

    def _cancel(self, rid: str) -> None:
        raise NotImplementedError

    def _fail_group(self, gid: int, text: str) -> None:
        raise NotImplementedError

    def _fail_everything(self, text: str) -> None:
        raise NotImplementedError
