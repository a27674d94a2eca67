"""The gRPC stage worker: serves whichever stages a coordinator asks it to load.

``noodle worker --port 50051 --model PATH`` runs :func:`noodle.executors.grpc.server.serve`. A coordinator
calls ``LoadStage(start, end)`` (only those units' weights are read), then per
generation ``CreateSession``, one ``ForwardStream`` (or unary ``Forward`` calls)
and ``CloseSession``.

Who may call: with a token (``--token`` / ``NOODLE_TOKEN``) every call must carry
``authorization: Bearer <token>`` or is refused with ``UNAUTHENTICATED``; with
``--tls-cert/--tls-key`` the port speaks TLS only. A worker refuses to listen on
a non-loopback address without a token unless told ``--insecure``.

Who may call, how many at once and for how long is decided from each call's metadata,
before its body is read, by :class:`~noodle.executors.grpc.gate.CallGate`.

What it refuses, and keeps serving: a tensor with an unknown dtype, a shape that
does not match its bytes, more bytes than ``max_tensor_bytes``, token ids outside
the vocabulary, a hidden size or dtype the stage does not take, a batch over
``max_batch``, a prefill or decode past the model's positions, a decode whose batch
is not its prefill's -> ``INVALID_ARGUMENT``; an unknown session or stage ->
``NOT_FOUND``; more than ``max_sessions`` open sessions -> ``RESOURCE_EXHAUSTED``
(after reaping the longest-idle session idle for ``evict_idle_s``, if any). Sessions
idle for ``idle_timeout_s`` (default 60 s) are closed by a reaper thread. Anything
else that goes wrong inside a stage is ``INTERNAL`` with a one-line message and an
error id (trailing metadata ``noodle-error-id``); the traceback goes to the worker's
log under that id, never to the caller.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from noodle.errors import ExecutorError, ModelError, SpecError
from noodle.executors.devices import make_stage, parse_device, warm_up
from noodle.executors.grpc import stage_service_pb2 as pb
from noodle.executors.grpc import stage_service_pb2_grpc as pb_grpc
from noodle.executors.grpc.config import DEFAULT_MAX_MESSAGE_BYTES, WorkerConfig, message_limit
from noodle.executors.grpc.gate import CallGate, CallLimits
from noodle.executors.grpc.probe import LinkProbes, ProbeRefused
from noodle.executors.grpc.throttle import Throttle
from noodle.executors.grpc.wire import from_proto, to_proto
from noodle.executors.kvbudget import max_positions
from noodle.executors.messages import StageInput
from noodle.executors.slicing import read_config, unit_names_of, weight_index
from noodle.executors.stage import StageRunner

__all__ = ["WorkerConfig", "StageServicer", "ERROR_ID_KEY", "DEFAULT_MAX_MESSAGE_BYTES", "message_limit"]

log = logging.getLogger(__name__)

ERROR_ID_KEY = "noodle-error-id"
_VERSION = "noodle.stage.v1"


class _Refuse(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _SessionEntry:
    stage_id: str
    last_used: float
    batch: int = 0  # of its prefill
    seen: int = 0  # positions used so far


class StageServicer(pb_grpc.StageServiceServicer):
    """The stage service; thread-safe (stage compute is serialized by one lock)."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.model_dir = Path(config.model_dir)
        model_config = read_config(self.model_dir)
        weight_index(self.model_dir)
        self.units = unit_names_of(self.model_dir)
        self.vocab_size = int(model_config.vocab_size)
        self.max_positions = max_positions(model_config)
        self.max_message_bytes = message_limit(model_config, config.max_batch, config.max_message_bytes)
        self.max_tensor_bytes = min(config.max_tensor_bytes, self.max_message_bytes)
        self.limits = CallLimits(max_calls=config.calls_limit, max_calls_per_peer=config.calls_per_peer_limit,
                                 body_timeout_s=config.body_timeout_s, stream_idle_s=config.stream_idle_s)  # fmt: skip
        self.gate = CallGate(config.token, self.limits)
        self.probes = LinkProbes(config.token, self.max_message_bytes, tls_ca=config.tls_cert)
        self.default_device = parse_device(config.device, field="--device")
        self.stages: dict[str, StageRunner] = {}
        self.sessions: dict[str, _SessionEntry] = {}
        self._dtypes: dict[int, torch.dtype] = {}
        self._lock = threading.Lock()  # stages and sessions dicts
        self._compute = threading.Lock()  # one stage step at a time: torch threads do the parallel work
        self._load = threading.Lock()
        self.throttle = Throttle(config.emulate_slowdown, config.slowdown_after_s)  # a no-op unless emulating
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="noodle-session-reaper", daemon=True)
        self._reaper.start()

    # -- housekeeping ------------------------------------------------------------------------
    def close(self) -> None:
        self._stop.set()
        self.gate.close()

    def reap(self, now: float | None = None) -> list[str]:
        """Close sessions idle longer than ``idle_timeout_s``; returns their ids."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [s for s, e in self.sessions.items() if now - e.last_used > self.config.idle_timeout_s]
            for sid in idle:
                entry = self.sessions.pop(sid)
                stage = self.stages.get(entry.stage_id)
                if stage is not None:
                    stage.end_session(sid)
        return idle

    def _evict_idlest_session(self) -> None:
        """At the session cap: close the session idle the longest, if idle for ``evict_idle_s`` (lock held)."""
        now = time.monotonic()
        sid, entry = min(self.sessions.items(), key=lambda kv: kv[1].last_used)
        if now - entry.last_used < self.config.evict_idle_s:
            return
        del self.sessions[sid]
        stage = self.stages.get(entry.stage_id)
        if stage is not None:
            stage.end_session(sid)
        log.info("session %s idle for %.1f s closed to make room (--max-sessions %d)", sid, now - entry.last_used,
                 self.config.max_sessions)  # fmt: skip

    def _reap_loop(self) -> None:
        interval = min(max(self.config.idle_timeout_s / 4, 0.05), 30.0)
        while not self._stop.wait(interval):
            self.reap()

    # -- helpers -----------------------------------------------------------------------------
    def _stage_info(self, sid: str, stage: StageRunner) -> pb.StageInfo:
        device = str(getattr(stage, "device", "cpu"))
        return pb.StageInfo(stage_id=sid, start=stage.start, end=stage.end, param_bytes=stage.param_bytes(), device=device)

    def _entry(self, session: str) -> tuple[_SessionEntry, StageRunner]:
        with self._lock:
            entry = self.sessions.get(session)
            if entry is None:
                raise _Refuse(grpc.StatusCode.NOT_FOUND, f"session: unknown session {session!r}; create it first")
            entry.last_used = time.monotonic()
            stage = self.stages.get(entry.stage_id)
        if stage is None:
            raise _Refuse(grpc.StatusCode.NOT_FOUND, f"session {session!r}: its stage {entry.stage_id} was unloaded")
        return entry, stage

    def _dtype_of(self, stage: StageRunner) -> torch.dtype:
        dtype = self._dtypes.get(id(stage))
        if dtype is None:
            dtype = next((p.dtype for m in stage.slice.modules() for p in m.parameters()), torch.float32)
            self._dtypes[id(stage)] = dtype
        return dtype

    def _check_input(self, stage: StageRunner, data: torch.Tensor, mask: torch.Tensor | None) -> None:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if stage.is_first:
            if data.dtype not in (torch.int64, torch.int32) or data.dim() != 2:
                raise _Refuse(bad, f"data: the first stage takes int64 token ids (batch, tokens), got {data.dtype} {list(data.shape)}")
            if data.numel() and (int(data.min()) < 0 or int(data.max()) >= self.vocab_size):
                raise _Refuse(bad, f"data: token ids must lie in [0, {self.vocab_size}), got [{int(data.min())}, {int(data.max())}]")
        else:
            hidden = int(stage.config.hidden_size)
            want = self._dtype_of(stage)
            if data.dim() != 3 or data.shape[-1] != hidden:
                raise _Refuse(bad, f"data: stage takes hidden states (batch, tokens, {hidden}), got {list(data.shape)}")
            if data.dtype != want:
                raise _Refuse(bad, f"data.dtype: stage computes in {str(want).removeprefix('torch.')}, got {str(data.dtype).removeprefix('torch.')}")
        if data.shape[0] < 1 or data.shape[1] < 1:
            raise _Refuse(bad, f"data: empty batch or no tokens, shape {list(data.shape)}")
        if mask is not None:
            if mask.dtype not in (torch.int64, torch.int32) or tuple(mask.shape) != tuple(data.shape[:2]):
                raise _Refuse(bad, f"attention_mask: expected int64 {list(data.shape[:2])}, got {mask.dtype} {list(mask.shape)}")
            if bool(((mask != 0) & (mask != 1)).any()):
                raise _Refuse(bad, "attention_mask: values must be 0 or 1")

    def _check_positions(self, entry: _SessionEntry, session: str, prefill: bool, batch: int, tokens: int) -> None:
        """The step fits the session: batch within ``max_batch`` and its prefill's, positions within the model's."""
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if batch > self.config.max_batch:
            raise _Refuse(bad, f"data: batch of {batch} sequences, over this worker's limit of {self.config.max_batch} (--max-batch)")
        if not prefill and batch != entry.batch:
            raise _Refuse(bad, f"data: session {session!r} was prefilled with batch {entry.batch}, got {batch} sequences")
        used = 0 if prefill else entry.seen
        limit = self.max_positions
        if limit is not None and used + tokens > limit:
            what = f"a prefill of {tokens} tokens" if prefill else f"{tokens} more token(s) after {used}"
            raise _Refuse(bad, f"data: {what} would pass the model's {limit} positions")

    def _forward(self, req: pb.ForwardRequest) -> pb.ForwardReply:
        t0 = time.monotonic_ns()
        entry, stage = self._entry(req.session)
        limit = self.max_tensor_bytes
        try:
            data = from_proto(req.data, field="data", max_bytes=limit)
            mask = from_proto(req.attention_mask, field="attention_mask", max_bytes=limit) if req.HasField("attention_mask") else None
        except SpecError as exc:
            raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        self._check_input(stage, data, mask)
        batch, tokens = int(data.shape[0]), int(data.shape[1])
        msg = StageInput(req.session, data.to(torch.long) if stage.is_first else data, mask, req.prefill, req.all_logits)
        t_in = time.monotonic_ns()
        with self._compute:
            if not req.prefill and req.session not in stage.sessions():
                raise _Refuse(grpc.StatusCode.FAILED_PRECONDITION, f"session {req.session!r}: the first step must be a prefill")
            self._check_positions(entry, req.session, req.prefill, batch, tokens)
            t_step = time.perf_counter()
            try:
                out = stage.step(msg)
            except ExecutorError as exc:  # StageRunner's own checks on the message
                raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            self.throttle.after_step(time.perf_counter() - t_step)
            entry.batch, entry.seen = batch, (0 if req.prefill else entry.seen) + tokens
            result = out.data
            top1 = req.top1 and out.is_logits
            if top1:
                result = result[:, -1, :].argmax(dim=-1)
            kv = stage.cache_bytes(req.session)
        t_out = time.monotonic_ns()
        reply = pb.ForwardReply(
            session=req.session, data=to_proto(result), is_logits=out.is_logits and not top1, is_top1=top1,
            seq=req.seq, t_in_ns=t_in, t_out_ns=t_out, decode_ns=t_in - t0, kv_cache_bytes=kv,
        )  # fmt: skip
        reply.encode_ns = time.monotonic_ns() - t_out
        return reply

    # -- the service ---------------------------------------------------------------------------
    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        with self._lock:
            stages = [self._stage_info(sid, st) for sid, st in self.stages.items()]
            n = len(self.sessions)
        return pb.HealthReply(
            status="serving", stages=stages, sessions=n, max_sessions=self.config.max_sessions,
            clock_ns=time.monotonic_ns(), version=_VERSION,
        )  # fmt: skip

    def LoadStage(self, request: pb.LoadStageRequest, context: grpc.ServicerContext) -> pb.LoadStageReply:
        return _guard(context, lambda: self._load_stage(request))

    def _load_stage(self, request: pb.LoadStageRequest) -> pb.LoadStageReply:
        n = len(self.units)
        if not 0 <= request.start < request.end <= n:
            raise _Refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"start/end: unit range [{request.start}, {request.end}) is not inside this model's [0, {n})",
            )
        try:
            device = parse_device(request.device, field="device") if request.device else self.default_device
        except SpecError as exc:
            raise _Refuse(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        sid = f"{request.start}-{request.end}@{device}"
        t0 = time.perf_counter()
        with self._load:
            with self._lock:
                stage = self.stages.get(sid)
            if stage is None:
                self._evict_for_one_more()
                try:
                    stage = make_stage(self.model_dir, request.start, request.end, name=request.name or sid, device=device)
                    warm_up(stage)
                except ModelError as exc:
                    raise _Refuse(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
                with self._lock:
                    self.stages[sid] = stage
        return pb.LoadStageReply(stage=self._stage_info(sid, stage), units=self.units, load_s=time.perf_counter() - t0)

    def _evict_for_one_more(self) -> None:
        """Drop the oldest stages without open sessions until one more fits under ``max_stages``."""
        with self._lock:
            busy = {e.stage_id for e in self.sessions.values()}
            for sid in [s for s in self.stages if s not in busy]:
                if len(self.stages) < self.config.max_stages:
                    break
                del self.stages[sid]
            if len(self.stages) >= self.config.max_stages:
                raise _Refuse(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"start/end: this worker holds {len(self.stages)} stages with open sessions, its limit (--max-stages)",
                )

    def UnloadStage(self, request: pb.UnloadStageRequest, context: grpc.ServicerContext) -> pb.UnloadStageReply:
        def run() -> pb.UnloadStageReply:
            with self._lock:
                if self.stages.pop(request.stage_id, None) is None:
                    raise _Refuse(grpc.StatusCode.NOT_FOUND, f"stage_id: no stage {request.stage_id!r} is loaded")
                gone = [s for s, e in self.sessions.items() if e.stage_id == request.stage_id]
                for s in gone:
                    del self.sessions[s]
            return pb.UnloadStageReply(closed_sessions=len(gone))

        return _guard(context, run)

    def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.ServicerContext) -> pb.CreateSessionReply:
        def run() -> pb.CreateSessionReply:
            if not request.session or len(request.session) > 128:
                raise _Refuse(grpc.StatusCode.INVALID_ARGUMENT, "session: give an id of 1 to 128 characters")
            self.reap()
            with self._lock:
                if request.stage_id not in self.stages:
                    raise _Refuse(grpc.StatusCode.NOT_FOUND, f"stage_id: no stage {request.stage_id!r} is loaded; call LoadStage")
                if request.session in self.sessions:
                    raise _Refuse(grpc.StatusCode.ALREADY_EXISTS, f"session: {request.session!r} already exists")
                if len(self.sessions) >= self.config.max_sessions:
                    self._evict_idlest_session()
                if len(self.sessions) >= self.config.max_sessions:
                    raise _Refuse(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"session: this worker holds {len(self.sessions)} sessions, its limit (--max-sessions)",
                    )
                self.sessions[request.session] = _SessionEntry(request.stage_id, time.monotonic())
            return pb.CreateSessionReply(session=request.session)

        return _guard(context, run)

    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardReply:
        return _guard(context, lambda: self._forward(request))

    def ForwardStream(self, request_iterator: Iterator[pb.ForwardRequest], context: grpc.ServicerContext) -> Iterator[pb.ForwardReply]:
        for req in request_iterator:
            yield _guard(context, lambda: self._forward(req))

    def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.ServicerContext) -> pb.CloseSessionReply:
        def run() -> pb.CloseSessionReply:
            with self._lock:
                entry = self.sessions.pop(request.session, None)
                if entry is None:
                    raise _Refuse(grpc.StatusCode.NOT_FOUND, f"session: unknown session {request.session!r}")
                stage = self.stages.get(entry.stage_id)
            kv = 0
            if stage is not None:
                kv = stage.cache_bytes(request.session)
                stage.end_session(request.session)
            return pb.CloseSessionReply(kv_cache_bytes=kv)

        return _guard(context, run)

    # -- link probing (noodle.probe.v1, see probe.py) ------------------------------------------
    def Echo(self, request: pb.EchoRequest, context: grpc.ServicerContext) -> pb.EchoReply:
        return _guard(context, lambda: self.probes.echo(request))

    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeReply:
        return _guard(context, lambda: self.probes.probe(request))


def _guard(context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; refusals become their status, anything unexpected INTERNAL with one line and an error id.

    The traceback is logged here under that id and never sent: a caller learns what failed, not the
    worker's code paths.
    """
    try:
        return fn()
    except (_Refuse, ProbeRefused) as exc:
        context.abort(exc.code, str(exc))
    except Exception as exc:  # noqa: BLE001 - logged here, one line to the caller
        ref = uuid.uuid4().hex[:12]
        log.error("error %s serving %s", ref, context.peer(), exc_info=True)
        first = (str(exc).splitlines() or [""])[0][:200]
        context.set_trailing_metadata(((ERROR_ID_KEY, ref),))
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {first} (worker error {ref}, see its log)")
