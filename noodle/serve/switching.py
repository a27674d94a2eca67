"""A pipeline whose executor can be replaced under it without failing a request.

:class:`SwitchingPipeline` looks like :class:`~noodle.executors.scheduler.Pipeline` to the
runtime (``submit``, ``stats``, ``close``, ``accepting``) and forwards to the pipeline of the
plan being served. :meth:`SwitchingPipeline.switch_to` moves to a new plan:

1. new requests are held (they wait, counted in ``queue_depth``);
2. requests in flight on the old pipeline may finish for up to ``drain_s``;
3. the old pipeline is closed: what is still running is cancelled and *requeued* as a
   continuation (its prompt plus the tokens it already streamed, asking for the rest), so
   a client sees one uninterrupted stream; greedy requests produce the very tokens they
   would have, sampled ones continue with a fresh sampler state;
4. the old executor closes, the new one opens, and the held requests go to its pipeline.

A request that ends in ``error`` (the executor's failover could not save it) is held
the same way and ``on_trouble`` is told, so the controller re-plans and it runs again on
the new pipeline (three tries at most).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from noodle.errors import ExecutorError, NoodleError
from noodle.executors.generation import Sampling
from noodle.executors.scheduler import Completion, QueueFull
from noodle.plandoc import PlanDoc

__all__ = ["SwitchingPipeline", "Ticket", "LivePlan", "MAX_RETRIES"]

MAX_RETRIES = 3
_ids = itertools.count()


class LivePlan:
    """The plan being served; attributes read through to the current :class:`~noodle.plandoc.PlanDoc`."""

    def __init__(self) -> None:
        self.current: PlanDoc | None = None

    def __getattr__(self, name: str) -> Any:
        cur = self.__dict__.get("current")
        if cur is None:
            if name in ("stages", "nodes", "units"):
                return []
            raise AttributeError(name)
        return getattr(cur, name)


@dataclass(eq=False)
class Ticket:
    """One request across pipelines; what ``submit`` returns (``id``, ``cancel``)."""

    id: str
    prompt: list[int]
    max_new: int
    sampling: Sampling
    on_token: Callable[[int], None] | None
    on_done: Callable[[Completion], None] | None
    tokens: list[int] = field(default_factory=list)
    inner: Any = None
    cancelled: bool = False
    retries: int = 0
    t_submit: float = field(default_factory=time.monotonic)
    finished: threading.Event = field(default_factory=threading.Event)
    on_cancel_held: Callable[[Ticket], None] | None = None  # ends it at once while it waits for a plan

    def cancel(self) -> None:
        self.cancelled = True
        if self.inner is not None:
            self.inner.cancel()
        elif self.on_cancel_held is not None:
            self.on_cancel_held(self)

    def done(self) -> bool:
        return self.finished.is_set()


class SwitchingPipeline:
    """See the module docstring. Opens nothing itself: the first :meth:`switch_to` does."""

    def __init__(self, *, max_queue: int = 64, on_trouble: Callable[[str], None] | None = None) -> None:
        self.max_queue = max_queue
        self.on_trouble = on_trouble or (lambda text: None)
        self._lock = threading.RLock()
        self._exec: Any = None
        self._pipe: Any = None
        self._holding = True
        self._held: collections.deque[Ticket] = collections.deque()
        self._active: dict[str, Ticket] = {}
        self._closed = False
        self._unavailable: str | None = None  # set by fail_waiting: no plan can serve; cleared by a switch
        self.requeued = 0

    # -- the Pipeline surface the runtime uses ------------------------------------------------------
    def start(self) -> SwitchingPipeline:
        return self

    @property
    def accepting(self) -> bool:
        return not self._closed

    def submit(self, prompt: Sequence[int], *, max_new_tokens: int, sampling: Sampling = Sampling(),
               on_token: Callable[[int], None] | None = None,
               on_done: Callable[[Completion], None] | None = None) -> Ticket:  # fmt: skip
        t = Ticket(f"c{next(_ids)}", [int(x) for x in prompt], int(max_new_tokens), sampling, on_token, on_done,
                   on_cancel_held=self._cancel_held)  # fmt: skip
        with self._lock:
            if self._closed:
                raise ExecutorError("pipeline: not accepting requests (shutting down)")
            if self._holding:
                if len(self._held) >= self.max_queue:
                    raise QueueFull(f"queue full: {len(self._held)} requests wait for the next plan (max_queue {self.max_queue})")
                self._held.append(t)
            else:
                self._send(t)
        return t

    def stats(self, window_s: float = 10.0) -> Any:
        pipe = self._pipe
        if pipe is None:
            return None
        s = pipe.stats(window_s)
        held = len(self._held)
        return dataclasses.replace(s, queue_depth=s.queue_depth + held) if held else s

    def close(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            self._closed = True
            held, self._held = list(self._held), collections.deque()
        for t in held:
            self._finish(t, "cancelled", "the server is shutting down")
        self._close_current(timeout_s)

    def __exit__(self, *exc: object) -> None:
        self.close(0.0)

    def _cancel_held(self, t: Ticket) -> None:
        """A held request was cancelled (client gone, drain timeout): it ends now, not when a plan opens."""
        with self._lock:
            if t not in self._held:
                return
            self._held.remove(t)
        self._finish(t, "cancelled", None)

    def fail_waiting(self, error: str) -> int:
        """No plan can be served now (no live worker): finish every held request with ``error`` at once, and every
        one that would be held from now until the next switch, instead of leaving it to its request timeout.
        Returns how many were held."""
        with self._lock:
            self._unavailable = error
            held, self._held = list(self._held), collections.deque()
        for t in held:
            self._finish(t, "error", error)
        return len(held)

    @property
    def executor(self) -> Any:
        return self._exec

    # -- switching ----------------------------------------------------------------------------------
    def switch_to(self, open_fn: Callable[[], tuple[Any, Any]], *, drain_s: float = 10.0) -> dict[str, float]:
        """Hold new requests, drain (then cancel and requeue) the old pipeline, open the new one, resume.

        Returns the seconds spent draining, closing and opening. If ``open_fn`` raises, requests stay
        held (nothing fails) and the exception propagates: call again with another plan.
        """
        t0 = time.monotonic()
        with self._lock:
            self._holding = True
            self._unavailable = None
        deadline = t0 + max(0.0, drain_s)
        while self._active and time.monotonic() < deadline:
            time.sleep(0.01)
        t1 = time.monotonic()
        self._close_current(0.0)  # what is still running is cancelled here and requeued by _done
        t2 = time.monotonic()
        executor, pipe = open_fn()
        pipe.start()
        with self._lock:
            self._exec, self._pipe = executor, pipe
            self._holding = False
            held, self._held = list(self._held), collections.deque()
            for t in held:
                if t.cancelled:
                    self._finish(t, "cancelled", None)
                    continue
                try:
                    self._send(t)
                except (QueueFull, NoodleError) as exc:
                    self._finish(t, "error", str(exc))
        return {"drain_s": t1 - t0, "close_s": t2 - t1, "open_s": time.monotonic() - t2}

    def _close_current(self, timeout_s: float) -> None:
        pipe, executor = self._pipe, self._exec
        if pipe is not None:
            with contextlib.suppress(Exception):
                pipe.close(timeout_s=timeout_s)
        if executor is not None:
            with contextlib.suppress(Exception):
                executor.__exit__(None, None, None)
        with self._lock:
            if self._pipe is pipe:
                self._pipe = self._exec = None

    # -- per request --------------------------------------------------------------------------------
    def _send(self, t: Ticket) -> None:
        pipe = self._pipe
        t.inner = pipe.submit(
            t.prompt + t.tokens, max_new_tokens=t.max_new - len(t.tokens), sampling=t.sampling,
            on_token=lambda tok: self._token(t, tok), on_done=lambda comp: self._done(t, comp, pipe),
        )  # fmt: skip
        self._active[t.id] = t
        if t.cancelled:
            t.inner.cancel()

    def _token(self, t: Ticket, tok: int) -> None:
        t.tokens.append(int(tok))
        if t.on_token is not None:
            t.on_token(tok)  # as it came: a SampledToken keeps its log probabilities

    def _done(self, t: Ticket, comp: Completion, pipe: Any) -> None:
        with self._lock:
            self._active.pop(t.id, None)
            switching = self._holding or pipe is not self._pipe
            broken = comp.finish_reason == "error"
            again = (not t.cancelled and not self._closed and t.retries < MAX_RETRIES and len(t.tokens) < t.max_new
                     and (broken or (switching and comp.finish_reason == "cancelled")))  # fmt: skip
            gone = self._unavailable if again and (switching or broken) else None
            if gone is not None:  # nothing will serve it: end it now, saying why
                again = False
                comp = dataclasses.replace(comp, finish_reason="error", error=gone)
            if again:
                t.retries += 1
                t.inner = None
                self.requeued += 1
                if switching or broken:
                    self._held.append(t)
                    if broken and not self._holding:
                        self._holding = True  # the executor is broken: hold everything until the re-plan
                        trouble = comp.error or "a request failed"
                    else:
                        trouble = None
                else:
                    trouble = None
                    self._send(t)
        if again:
            if trouble is not None:
                self.on_trouble(trouble)
            return
        self._finish(t, comp.finish_reason, comp.error)

    def _finish(self, t: Ticket, reason: str, error: str | None) -> None:
        if t.finished.is_set():
            return
        t.finished.set()
        comp = Completion(request_id=t.id, prompt_tokens=len(t.prompt), tokens=list(t.tokens), finish_reason=reason,
                          error=error, queued_s=0.0)  # fmt: skip
        if t.on_done is not None:
            with contextlib.suppress(Exception):
                t.on_done(comp)
