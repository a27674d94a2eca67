"""Before a joined worker is planned in, the coordinator times a real stage step on it.

A worker's join carries its own unit table (:class:`~noodle.serve.claims.CostReport`); a table
claiming 0.00 ms per unit would otherwise put every stage on that worker. :class:`JoinVerifier`
(one thread) takes each pending node (:meth:`~noodle.serve.registry.ClusterRegistry.pending`) and,
through the worker's own gRPC stage service:

1. pings it (``Health``, :data:`PINGS` times; ``ping_ms`` = the fastest round trip);
2. loads a one-unit stage of a block drawn at random (a worker cannot know which of its claims
   is checked), creates a session, prefills :data:`PROMPT_TOKENS` random hidden states and times
   :data:`STEPS` one-token decode steps from here (``Forward``, wall clock);
3. takes ``measured = max(min(wall) - ping_ms, min(worker-reported compute))``: a lower bound of what a
   step takes there (the fastest step, so a busy machine's stalls do not count against the worker; the
   worker's own figure can only raise it; the wall clock bounds what it may hide), and compares it with
   what the table claims for that stage: the block's ``decode_ms`` plus the step overhead.

With ``ratio = measured / claimed``: within ``[1/factor, factor]`` (:data:`FACTOR` = 8) the table is
trusted as it is; beyond, the node's whole table is scaled by ``ratio`` (a correction over all its
units, as the drift feedback writes them: :func:`~noodle.serve.registry.corrected`), with one event
line. A worker that cannot load or step the stage is refused: its heartbeats are answered 403 with
the reason and it exits. The probe stage is unloaded afterwards (unless the worker held it before). Only then does the node count as
joined (the controller re-plans).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noodle.errors import ExecutorError
from noodle.executors.grpc.throttle import PROBE_PREFIX
from noodle.models.card import ModelCard, read_card
from noodle.serve.registry import ClusterRegistry, WorkerRecord

__all__ = ["JoinVerifier", "StageTiming", "time_stage", "FACTOR", "STEPS", "PROMPT_TOKENS"]

log = logging.getLogger(__name__)

FACTOR = 8.0  # honest tiny-model workers measure up to ~3x their table here (per-step gRPC work); lies of 0.00 ms are 100x+
STEPS = 8
PROMPT_TOKENS = 8
PINGS = 5


@dataclass(frozen=True)
class StageTiming:
    """One timed probe: the unit, the coordinator's wall clock per step, the worker's own figure, the ping."""

    unit: int
    wall_ms: tuple[float, ...]
    reported_ms: tuple[float, ...]
    ping_ms: float

    @property
    def measured_ms(self) -> float:
        """The stage's decode step as timed from here (see the module docstring)."""
        return max(min(self.wall_ms) - self.ping_ms, min(self.reported_ms))


def _hidden(card: ModelCard, tokens: int) -> Any:
    """Random hidden states (1, tokens, hidden) in the checkpoint's dtype, as a block stage takes them."""
    import torch

    config = card.hf_config
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return torch.randn(1, tokens, int(config.hidden_size)).to(dtype if isinstance(dtype, torch.dtype) else torch.float32)


def time_stage(address: str, model: Path | ModelCard, unit: int, *, token: str | None, steps: int = STEPS,
               timeout_s: float = 60.0) -> StageTiming:  # fmt: skip
    """Load units ``[unit, unit + 1)`` on the worker at ``address``, time ``steps`` decode steps, unload."""
    from noodle.executors.grpc import stage_service_pb2 as pb
    from noodle.executors.grpc.client import WorkerClient
    from noodle.executors.grpc.wire import to_proto

    card = model if isinstance(model, ModelCard) else read_card(model)
    client = WorkerClient(address, token=token)
    try:
        client.sync_clock(min(timeout_s, 5.0), rounds=PINGS, within_s=min(timeout_s, 5.0))
        held = {st.stage_id for st in client.health(min(timeout_s, 5.0)).stages}  # not unloaded afterwards
        loaded = client.unary("LoadStage", pb.LoadStageRequest(start=unit, end=unit + 1, name=f"verify-{unit}"),
                              timeout_s, "verify")  # fmt: skip
        sid = loaded.stage.stage_id  # type: ignore[attr-defined]
        session = f"{PROBE_PREFIX}{random.getrandbits(48):012x}"
        client.unary("CreateSession", pb.CreateSessionRequest(stage_id=sid, session=session), timeout_s, "verify")
        try:
            states = _hidden(card, PROMPT_TOKENS + steps)
            first = pb.ForwardRequest(session=session, prefill=True)
            first.data.CopyFrom(to_proto(states[:, :PROMPT_TOKENS].contiguous()))
            client.unary("Forward", first, timeout_s, "verify")
            wall, reported = [], []
            for i in range(PROMPT_TOKENS, PROMPT_TOKENS + steps):
                req = pb.ForwardRequest(session=session)
                req.data.CopyFrom(to_proto(states[:, i : i + 1].contiguous()))
                t0 = time.perf_counter()
                reply: Any = client.unary("Forward", req, timeout_s, "verify")
                wall.append((time.perf_counter() - t0) * 1e3)
                reported.append(max(0, reply.t_out_ns - reply.t_in_ns) / 1e6)
        finally:
            cleanup: list[tuple[str, Any]] = [("CloseSession", pb.CloseSessionRequest(session=session))]
            if sid not in held:
                cleanup.append(("UnloadStage", pb.UnloadStageRequest(stage_id=sid)))
            for method, request in cleanup:
                try:
                    client.unary(method, request, 5.0, "verify")
                except Exception:  # noqa: BLE001 - best effort: the worker reaps idle sessions and stages itself
                    pass
        return StageTiming(unit, tuple(wall), tuple(reported), client.ping_ms or 0.0)
    finally:
        client.close()


class JoinVerifier:
    """Times a stage on every pending node, then verifies, scales or refuses it (see the module docstring)."""

    def __init__(self, registry: ClusterRegistry, model: Path | ModelCard, events: Any, *, token: str | None,
                 factor: float = FACTOR, steps: int = STEPS, timeout_s: float = 60.0) -> None:  # fmt: skip
        self.registry = registry
        self.card = model if isinstance(model, ModelCard) else read_card(model)
        self.events = events
        self.token = token
        self.factor = factor
        self.steps = steps
        self.timeout_s = timeout_s
        self._rng = random.Random()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> JoinVerifier:
        self._thread = threading.Thread(target=self._loop, name="noodle-verify", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            for rec in self.registry.pending():
                if self._stop.is_set():
                    return
                try:
                    self.check(rec)
                except Exception as exc:  # noqa: BLE001 - the verifier must survive; the node stays unplanned
                    log.exception("verifying node %s failed: %s", rec.id, exc)
                    self.registry.refuse(rec.id, rec.secret, f"the coordinator could not time a stage on it ({exc})")

    def check(self, rec: WorkerRecord) -> float | None:
        """Time a random block on ``rec``; verify it (scaled when off by more than ``factor``) or refuse it.
        Returns the scale applied (None: trusted as claimed, or refused)."""
        names = rec.profile.unit_names
        blocks = [i for i in range(len(names)) if 0 < i < len(names) - 1] or list(range(len(names)))
        unit = self._rng.choice(blocks)
        try:
            timing = time_stage(rec.address, self.card, unit, token=self.token, steps=self.steps,
                                timeout_s=self.timeout_s)  # fmt: skip
        except ExecutorError as exc:
            why = f"a timed stage step on it failed ({str(exc).splitlines()[0]})"
            self.registry.refuse(rec.id, rec.secret, why)
            self.events.add("warning", f"node {rec.id} refused: {why}")
            return None
        except Exception as exc:  # noqa: BLE001 - WorkerGone and grpc errors: it does not answer
            why = f"its stage service does not answer at {rec.address} ({type(exc).__name__}: {exc})"
            self.registry.refuse(rec.id, rec.secret, why)
            self.events.add("warning", f"node {rec.id} refused: {why}")
            return None
        claimed = float(rec.profile.latency_ms[unit]) + rec.profile.step_overhead_ms
        measured = timing.measured_ms
        ratio = measured / claimed if claimed > 0 else float("inf")
        what = (f"node {rec.id} claims {claimed:.3f} ms per decode step of {names[unit]}; timed on it: "
                f"{measured:.3f} ms (fastest of {len(timing.wall_ms)} steps, ping {timing.ping_ms:.3f} ms)")  # fmt: skip
        if 1 / self.factor <= ratio <= self.factor:
            if self.registry.verify(rec.id, rec.secret):
                self.events.add("info", f"{what}: its table is trusted")
            return None
        if self.registry.verify(rec.id, rec.secret, factor=ratio):
            self.events.add("warning", f"{what}, x{ratio:.3g}, beyond x{self.factor:g}: its table is scaled by "
                                       f"{ratio:.3g} before it is planned")  # fmt: skip
        return ratio
