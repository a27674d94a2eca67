"""What callers of the pipelined engine hold: requests, their completions, the stats, and the lane protocol.

:mod:`noodle.executors.scheduler` runs the engine; this module keeps its plain data apart.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from noodle.errors import ExecutorError, NoodleError
from noodle.executors.generation import Sampler
from noodle.executors.messages import StageInput, StageOutput

if TYPE_CHECKING:
    from noodle.executors.pipecore import PipelineCore

__all__ = ["QueueFull", "Lane", "Completion", "LaneStats", "PipelineStats", "RequestHandle"]


class QueueFull(NoodleError):
    """Too many requests wait already; retry later."""

    exit_code = 5


class Lane(Protocol):
    """One stage as the pipeline sees it; each lane is driven by exactly one thread."""

    name: str

    def run(self, msg: StageInput) -> StageOutput:
        """Run one step of ``msg.session`` on this stage (and hand its output on)."""
        ...

    def end(self, session: str) -> None:
        """Free ``session``'s KV cache (unknown ids are ignored)."""
        ...


@dataclass(frozen=True)
class Completion:
    """How one request ended. Times are seconds; ``itl_s`` are the gaps between tokens."""

    request_id: str
    prompt_tokens: int
    tokens: list[int]
    finish_reason: str  # stop | length | cancelled | error
    error: str | None = None
    queued_s: float = 0.0
    ttft_s: float | None = None
    itl_s: tuple[float, ...] = ()


@dataclass(frozen=True)
class LaneStats:
    """One lane over the stats window: busy fraction, step and hop medians (ms), bytes handed on."""

    name: str
    busy_fraction: float
    step_ms_p50: float
    step_ms_p95: float
    hop_ms_p50: float
    steps: int
    bytes_out: int
    planned_ms: float | None = None


@dataclass(frozen=True)
class PipelineStats:
    """A snapshot of the engine."""

    queue_depth: int
    in_flight: int
    groups_in_flight: int
    completed: int
    tokens_generated: int
    tokens_per_s: float
    stages: tuple[LaneStats, ...]
    failovers: tuple[object, ...] = ()  # the executor's FailoverEvents so far (grpc, torchrpc)
    peak_in_flight: int = 0  # most sequences in flight at once so far
    kv_capacity_tokens: int | None = None  # the tightest stage's KV budget (None: unbounded)
    kv_reserved_tokens: int = 0  # context tokens the sequences in flight hold on every stage
    preemptions: int = 0  # sequences sent back to the queue to free KV (recomputed later, continuous batching)


class RequestHandle:
    """A submitted request: cancel it, or wait for its :class:`Completion`."""

    def __init__(self, pipe: PipelineCore, rid: str) -> None:
        self._pipe = pipe
        self.id = rid
        self._done = threading.Event()
        self._completion: Completion | None = None

    def cancel(self) -> None:
        """Stop generating; its sequence and KV cache are freed within one step."""
        self._pipe._events.put(("cancel", self.id))

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request ends (``ExecutorError`` after ``timeout`` seconds)."""
        if not self._done.wait(timeout):
            raise ExecutorError(f"request {self.id}: not finished after {timeout} s")
        if self._completion is None:  # set before the event, always
            raise ExecutorError(f"request {self.id}: ended without a completion")
        return self._completion


@dataclass(eq=False)
class _Request:
    rid: str
    prompt: list[int]
    max_new_tokens: int
    sampler: Sampler
    on_token: Callable[[int], None] | None
    on_done: Callable[[Completion], None] | None
    handle: RequestHandle
    t_submit: float
    t_admit: float = 0.0
    tokens: list[int] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None
    notified: bool = False


@dataclass(eq=False)
class _Group:
    gid: int
    session: str
    requests: list[_Request]
    mask: torch.Tensor | None
    reserved_tokens: int
    steps: int = 0


@dataclass
class _Step:
    group: int
    msg: StageInput
    final: bool  # its logits feed the sampler (the last prefill chunk, and every decode step)
    decode: bool = False  # a decode step: the first lane takes it before queued prefill chunks


class _Inbox:
    """A lane's queue: decode steps go before waiting prefill work, the rest in order.

    A long prompt's chunks wait in the lanes' queues; a decode step of another group overtakes
    them, so it is not stalled behind the whole prefill. Order within a group is kept: its
    decode steps only exist after its prefill came back, and its end marker only after its
    last step.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._urgent: deque[object] = deque()
        self._rest: deque[object] = deque()

    def put(self, item: object) -> None:
        with self._cond:
            (self._urgent if isinstance(item, _Step) and item.decode else self._rest).append(item)
            self._cond.notify()

    def get(self) -> object:
        with self._cond:
            while not self._urgent and not self._rest:
                self._cond.wait()
            return self._urgent.popleft() if self._urgent else self._rest.popleft()


@dataclass
class _End:
    session: str


class _LaneMeter:
    """Busy time and recent step/hop times of one lane (written by its thread only)."""

    def __init__(self, name: str, planned_ms: float | None) -> None:
        self.name = name
        self.planned_ms = planned_ms
        self.busy: deque[tuple[float, float]] = deque(maxlen=4096)  # (start, end) monotonic seconds
        self.step_ms: deque[float] = deque(maxlen=512)
        self.hop_ms: deque[float] = deque(maxlen=512)
        self.bytes_out = 0
        self.steps = 0

    def snapshot(self, window_s: float) -> LaneStats:
        now = time.monotonic()
        lo = now - window_s
        busy = sum(max(0.0, min(e, now) - max(s, lo)) for s, e in list(self.busy) if e > lo)
        steps = list(self.step_ms)
        hops = list(self.hop_ms)
        return LaneStats(
            name=self.name,
            busy_fraction=min(1.0, busy / window_s) if window_s > 0 else 0.0,
            step_ms_p50=float(np.percentile(steps, 50)) if steps else 0.0,
            step_ms_p95=float(np.percentile(steps, 95)) if steps else 0.0,
            hop_ms_p50=float(np.percentile(hops, 50)) if hops else 0.0,
            steps=self.steps,
            bytes_out=self.bytes_out,
            planned_ms=self.planned_ms,
        )
