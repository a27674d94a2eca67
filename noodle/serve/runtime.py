"""The pipelined engine as the HTTP layer sees it: load, submit, stream text, drain, close.

The engine (:mod:`noodle.executors.scheduler`) runs on its own thread and calls back
per token; :class:`Runtime` bridges those callbacks onto the asyncio loop with
``call_soon_threadsafe``, turns token ids into text (incremental detokenization, stop
strings), enforces the per-request timeout and cancels the request when its client goes
(a stream finds out when a write fails; a non-streaming request checks every 0.25 s).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from noodle.errors import NoodleError, SpecError
from noodle.executors.generation import Sampling, TokenLogprobs
from noodle.executors.scheduler import QueueFull
from noodle.serve.protocol import ApiError
from noodle.serve.text import Detokenizer, StopMatcher

__all__ = ["Limits", "Delta", "Finish", "Runtime", "Stream", "Opener", "RequestObserver"]

log = logging.getLogger(__name__)
DISCONNECT_CHECK_S = 0.25  # a non-streaming request looks for its client this often, tokens flowing or not

# () -> (executor already entered, pipeline not yet started)
Opener = Callable[[], tuple[Any, Any]]


@dataclass(frozen=True)
class Limits:
    """What a request may ask for: prompt length and context, both in tokens."""

    prompt_tokens: int
    context_tokens: int
    vocab_size: int


@dataclass(frozen=True)
class Delta:
    """New text; one per generated token (``""`` while text is held back), so clients see every token's timing.

    ``token`` is the id it came from (``None`` for text released at the end); ``logprobs`` are that
    token's when the request asked for them.
    """

    text: str
    token: int | None = None
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class Finish:
    reason: str  # stop | length | timeout | error | cancelled
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class RequestObserver:
    """What the runtime reports about each request (the server's metrics); this base ignores it all.

    ``finished``'s reason is a :class:`Finish` reason, or ``disconnected`` when the client left.
    ``queued`` is called on the engine's thread, the rest on the event loop.
    """

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        """The first token came ``seconds`` after the request was submitted."""

    def next_token(self, seconds: float) -> None:
        """Another token came ``seconds`` after the one before."""

    def queued(self, seconds: float) -> None:
        """The request waited ``seconds`` for a place in the pipeline."""

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        """The request ended ``seconds`` after it was submitted."""


@dataclass
class _Sample:
    t: float
    tokens_per_s: float
    in_flight: int
    queue_depth: int


@dataclass
class Events:
    """Recent events for the status page (thread-safe, bounded)."""

    items: collections.deque[dict[str, Any]] = field(default_factory=lambda: collections.deque(maxlen=50))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, level: str, message: str) -> None:
        with self._lock:
            self.items.append({"t": time.time(), "level": level, "message": message})
        getattr(log, "warning" if level == "warning" else "info")(message)

    def recent(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(reversed(self.items))


class Runtime:
    """Owns the executor and its pipeline for the server's lifetime.

    Args:
        opener: loads the stages and builds the pipeline (blocking; run on a thread).
        tokenizer: the model's tokenizer (a transformers tokenizer).
        limits: prompt and context limits from the plan and the model.
        eos_ids: token ids that end a sequence (not decoded into text).
        request_timeout_s: a request still generating after this long is cancelled.
    """

    def __init__(
        self,
        opener: Opener,
        tokenizer: Any,
        limits: Limits,
        *,
        eos_ids: Sequence[int] = (),
        request_timeout_s: float = 300.0,
        retry_after_s: int = 1,
    ) -> None:
        self._opener = opener
        self.tokenizer = tokenizer
        self.limits = limits
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.request_timeout_s = request_timeout_s
        self.retry_after_s = retry_after_s
        self.state = "loading"  # loading | ready | draining | closed | failed
        self.error: str | None = None
        self.executor: Any = None
        self.pipeline: Any = None
        self.events = Events()
        self._failovers_seen = 0
        self.history: collections.deque[_Sample] = collections.deque(maxlen=600)
        self.started_at = time.time()
        self._active: dict[str, Any] = {}  # request id -> handle
        self.observer = RequestObserver()
        # Why a ready engine cannot serve now (message, Retry-After seconds), e.g. no live worker; None: it can.
        self.unavailable: Callable[[], tuple[str, int] | None] = lambda: None

    # -- lifecycle -----------------------------------------------------------------------------
    def load(self) -> None:
        """Load the stages and start the pipeline (blocking); ``state`` becomes ready or failed."""
        t0 = time.perf_counter()
        try:
            self.executor, self.pipeline = self._opener()
            self.pipeline.start()
        except Exception as exc:  # noqa: BLE001 - any load failure is reported on /readyz and the status page
            if self.state in ("draining", "closed"):  # stopped while loading (or waiting for workers)
                self.events.add("info", f"stopped before the stages were loaded ({exc})")
                return
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            self.events.add("warning", f"loading the stages failed: {self.error}")
            return
        if self.state == "loading":
            self.state = "ready"
        self.events.add("info", f"stages loaded and pipeline started in {time.perf_counter() - t0:.1f} s")

    def drain(self) -> None:
        """Stop accepting requests (503); in-flight ones go on."""
        if self.state in ("loading", "ready"):
            self.state = "draining"
            self.events.add("info", f"draining: refusing new requests, {len(self._active)} in flight")

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def cancel_all(self) -> None:
        for handle in list(self._active.values()):
            handle.cancel()

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the pipeline (finishing or cancelling what is in flight) and the executor."""
        if self.state == "closed":
            return
        self.state = "closed"
        if self.pipeline is not None:
            with contextlib.suppress(Exception):
                self.pipeline.close(timeout_s=timeout_s)
        if self.executor is not None:
            with contextlib.suppress(Exception):
                self.executor.__exit__(None, None, None)
        self.events.add("info", "pipeline and executor closed")

    def stats(self) -> Any | None:
        if self.pipeline is None:
            return None
        try:
            return self.pipeline.stats()
        except Exception:  # noqa: BLE001 - a closed pipeline has no stats to give
            return None

    def sample(self) -> None:
        """Record one point of the status page's history (tokens/s, in flight, queue)."""
        s = self.stats()
        if s is not None:
            self.history.append(_Sample(time.time(), float(s.tokens_per_s), int(s.in_flight), int(s.queue_depth)))
            failovers = getattr(s, "failovers", ())
            if len(failovers) < self._failovers_seen:  # a re-plan opened a new executor: its list starts empty
                self._failovers_seen = 0
            for ev in failovers[self._failovers_seen:]:
                self.events.add("warning", f"failover on {getattr(ev, 'node', '?')}: {getattr(ev, 'action', '?')}: "
                                           f"{getattr(ev, 'detail', '')} ({getattr(ev, 'seconds', 0.0):.2f} s)")
            self._failovers_seen = len(failovers)

    # -- requests ------------------------------------------------------------------------------
    def check_ready(self) -> None:
        if self.state == "ready":
            down = self.unavailable()
            if down is not None:
                raise ApiError(503, down[0], type="server_error", code="unavailable",
                               headers={"Retry-After": str(down[1])})  # fmt: skip
            return
        if self.state == "loading":
            raise ApiError(503, "the model's stages are still loading; retry shortly", type="server_error",
                           code="loading", headers={"Retry-After": str(self.retry_after_s)})  # fmt: skip
        if self.state == "failed":
            raise ApiError(503, f"the engine failed to start: {self.error}", type="server_error", code="engine_failed")
        raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down",
                       headers={"Retry-After": str(self.retry_after_s)})  # fmt: skip

    def check_length(self, prompt_len: int, max_tokens: int, *, tokens_param: str, prompt_param: str) -> None:
        """A 400 ``context_length_exceeded`` when the prompt, or prompt + new tokens, do not fit the plan."""
        lim = self.limits
        if prompt_len > lim.prompt_tokens or prompt_len + max_tokens > lim.context_tokens:
            raise ApiError(
                400,
                f"this model's context is {lim.context_tokens} tokens (prompts up to {lim.prompt_tokens}); the request "
                f"has a {prompt_len}-token prompt and asks for {max_tokens} new tokens; shorten the prompt or lower "
                f"{tokens_param}",
                param=prompt_param if prompt_len > lim.prompt_tokens else tokens_param,
                code="context_length_exceeded",
            )

    def submit(self, prompt_ids: list[int], *, max_tokens: int, sampling: Sampling, stops: Sequence[str],
               name: str | None = None) -> Stream:  # fmt: skip
        """Submit a request to the pipeline; the returned :class:`Stream` yields its text.

        ``name`` (the request's ``X-Request-Id``) names it in the log lines; default: the engine's id.
        """
        self.check_ready()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        submitted: list[Any] = []

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def done(completion: Any) -> None:
            with contextlib.suppress(Exception):  # a metric must never break a request
                self.observer.queued(float(completion.queued_s))
            put(completion)
            with contextlib.suppress(RuntimeError):  # in case the stream was never read (client left early)
                loop.call_soon_threadsafe(lambda: [self._active.pop(h.id, None) for h in submitted])

        t0 = time.perf_counter()
        try:
            handle = self.pipeline.submit(
                prompt_ids, max_new_tokens=max_tokens, sampling=sampling,
                on_token=put, on_done=done,  # a SampledToken when logprobs were asked for
            )  # fmt: skip
        except QueueFull:
            raise ApiError(429, "the request queue is full; retry later", type="rate_limit_exceeded",
                           code="queue_full", headers={"Retry-After": str(self.retry_after_s)}) from None  # fmt: skip
        except SpecError as exc:  # the engine's own context and KV-cache checks
            raise ApiError(400, str(exc), param="prompt", code="context_length_exceeded") from None
        except NoodleError as exc:
            if self.state != "ready" or not getattr(self.pipeline, "accepting", True):
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down",
                               headers={"Retry-After": str(self.retry_after_s)}) from None  # fmt: skip
            raise ApiError(400, str(exc), code="invalid_value") from None
        submitted.append(handle)
        self._active[handle.id] = handle
        return Stream(self, handle, queue, prompt_ids, stops, t0, name or handle.id)


class Stream:
    """One request's text as it is generated; iterate :meth:`events` exactly once."""

    def __init__(self, rt: Runtime, handle: Any, queue: asyncio.Queue[Any], prompt_ids: list[int],
                 stops: Sequence[str], t0: float, name: str) -> None:  # fmt: skip
        self._rt = rt
        self.handle = handle
        self.name = name
        self._ended = False
        self._queue = queue
        self._prompt_len = len(prompt_ids)
        self._det = Detokenizer(rt.tokenizer, prompt_ids)
        self._stop = StopMatcher(stops)
        self._t0 = t0
        self.completion_tokens = 0

    def _finish(self, reason: str, error: str | None = None) -> Finish:
        self._ended = True
        self._rt.observer.finished(reason, self._prompt_len, self.completion_tokens, time.perf_counter() - self._t0)
        log.info("request %s: %s after %.2f s, %d prompt + %d completion tokens%s", self.name, reason,
                 time.perf_counter() - self._t0, self._prompt_len, self.completion_tokens,
                 f" ({error})" if error else "")  # fmt: skip
        return Finish(reason, self._prompt_len, self.completion_tokens, error)

    async def events(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[Delta | Finish]:
        """Text deltas, then one :class:`Finish`; cancels the request if the consumer stops early."""
        rt = self._rt
        deadline = self._t0 + rt.request_timeout_s
        last: float | None = None
        next_check = time.perf_counter() + DISCONNECT_CHECK_S
        try:
            while True:
                if disconnected is not None and time.perf_counter() >= next_check:  # tokens may never pause
                    next_check = time.perf_counter() + DISCONNECT_CHECK_S
                    if await disconnected():
                        self.handle.cancel()
                        return
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    self.handle.cancel()
                    rt.events.add("warning", f"request {self.name} timed out after {rt.request_timeout_s:g} s")
                    yield self._finish("timeout", f"the request took longer than {rt.request_timeout_s:g} s")
                    return
                wait = min(remaining, DISCONNECT_CHECK_S) if disconnected is not None else remaining
                try:
                    item = await asyncio.wait_for(self._queue.get(), timeout=wait)
                except asyncio.TimeoutError:
                    if disconnected is not None and await disconnected():
                        self.handle.cancel()
                        return
                    continue
                if isinstance(item, int):
                    now = time.perf_counter()
                    if last is None:
                        rt.observer.first_token(now - self._t0, self._prompt_len)
                    else:
                        rt.observer.next_token(now - last)
                    last = now
                    self.completion_tokens += 1
                    if item in rt.eos_ids:
                        continue
                    text = self._stop.feed(self._det.add(item))
                    delta = Delta(text, int(item), getattr(item, "logprobs", None))
                    if self._stop.matched is not None:
                        if text or delta.logprobs is not None:
                            yield delta
                        self.handle.cancel()
                        yield self._finish("stop")
                        return
                    yield delta  # one event per token: "" while a character or a possible stop is held back
                    continue
                tail = self._stop.feed(self._det.flush()) + self._stop.flush()
                if tail:
                    yield Delta(tail)
                reason = "stop" if self._stop.matched is not None else str(item.finish_reason)
                if reason == "error":
                    rt.events.add("warning", f"request {self.name} failed: {item.error}")
                yield self._finish(reason, item.error)
                return
        finally:
            if not self._ended:
                rt.observer.finished("disconnected", self._prompt_len, self.completion_tokens,
                                     time.perf_counter() - self._t0)  # fmt: skip
                log.info("request %s: the client left after %.2f s, %d completion tokens", self.name,
                         time.perf_counter() - self._t0, self.completion_tokens)  # fmt: skip
            self.handle.cancel()  # no-op once finished; frees the sequence when the client went away
            rt._active.pop(self.handle.id, None)
