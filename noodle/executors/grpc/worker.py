"""The gRPC stage worker: serves whichever stages a coordinator asks it to load.

``noodle worker --port 50051 --model PATH`` runs :func:`noodle.executors.grpc.server.serve`. A coordinator
calls ``LoadStage(start, end)`` (only those units' weights are read), then per
generation ``CreateSession``, one ``ForwardStream`` (or unary ``Forward`` calls)
and ``CloseSession``.

Who may call: with a token (``--token`` / ``NOODLE_TOKEN``) every call must carry
``authorization: Bearer <token>`` or is refused with ``UNAUTHENTICATED``; with
``--tls-cert/--tls-key`` the port speaks TLS only. A worker refuses to listen on
a non-loopback address without a token unless told ``--insecure``. Who may call, how many at
once and for how long is decided from each call's metadata, before its body is read, by
:class:`~noodle.executors.grpc.gate.CallGate`.

Packed steps (continuous batching): a ``ForwardRequest`` with ``seqs`` carries the new tokens of
many sequences back to back. A lane opens one session for them; each sequence's KV lives on the
stage under that session (:func:`~noodle.executors.grpc.edge.seq_key`), is freed by
``CloseSession(session, seqs=[...])`` (the session stays open) and with the whole session
(``CloseSession``, the reaper, eviction). A session runs batch steps or packed steps, never both.

What it refuses, and keeps serving: every check of a ``Forward`` request is in
:mod:`~noodle.executors.grpc.edge` (``INVALID_ARGUMENT`` for a malformed step,
``FAILED_PRECONDITION`` for one the session's state does not allow, each naming the field and
the numbers; docs/distributed.md has the table); an unknown session or stage -> ``NOT_FOUND``;
more than ``max_sessions`` open sessions -> ``RESOURCE_EXHAUSTED`` (after closing the session idle
longest if idle for ``evict_idle_s``). Sessions idle for ``idle_timeout_s`` (60 s) are closed by a
reaper thread. Anything else that goes wrong inside a stage is ``INTERNAL`` with one line and an
error id (trailing metadata ``noodle-error-id``); the traceback stays in the worker's log.
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
from noodle.executors.grpc.config import DEFAULT_MAX_MESSAGE_BYTES, WorkerConfig, message_limit, step_token_limit
from noodle.executors.grpc.edge import (PackedLimits, Refused, admit_packed, check_batch_positions, check_id, check_input,
                                        check_packed, seq_key)  # fmt: skip
from noodle.executors.grpc.gate import CallGate, CallLimits
from noodle.executors.grpc.probe import LinkProbes, ProbeRefused
from noodle.executors.grpc.throttle import PROBE_PREFIX, Throttle
from noodle.executors.grpc.wire import from_proto, to_proto
from noodle.executors.kvbudget import max_positions
from noodle.executors.messages import SeqChunk, StageInput, StageOutput
from noodle.executors.slicing import read_config, unit_names_of, weight_index
from noodle.executors.stage import StageRunner
from noodle.formats import FORMATS, format_problem

__all__ = ["WorkerConfig", "StageServicer", "ERROR_ID_KEY", "DEFAULT_MAX_MESSAGE_BYTES", "message_limit"]

log = logging.getLogger(__name__)

ERROR_ID_KEY = "noodle-error-id"
_VERSION = "noodle.stage.v1"


@dataclass
class _SessionEntry:
    stage_id: str
    last_used: float
    batch: int = 0  # of its prefill
    seen: int = 0  # positions used so far
    seqs: dict[str, int] | None = None  # a packed session's live sequences -> positions used (None: batch steps)


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
        fit = step_token_limit(model_config, self.max_tensor_bytes)
        self.packed = PackedLimits(config.max_seqs, min(config.max_step_tokens or fit, fit), self.max_positions)
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
                self._release(sid, self.sessions.pop(sid))
        return idle

    def _release(self, sid: str, entry: _SessionEntry, seqs: list[str] | None = None) -> int:
        """Free the KV of a closed session (a packed one's sequences too), or only ``seqs`` of it; the bytes they held."""
        stage = self.stages.get(entry.stage_id)
        keys = [sid, *(seq_key(sid, q) for q in list(entry.seqs or ()))] if seqs is None else [seq_key(sid, q) for q in seqs]
        if stage is None:
            return 0
        kv = sum(stage.cache_bytes(k) for k in keys)
        for k in keys:
            stage.end_session(k)
        return kv

    def _evict_idlest_session(self) -> None:
        """At the session cap: close the session idle the longest, if idle for ``evict_idle_s`` (lock held)."""
        now = time.monotonic()
        sid, entry = min(self.sessions.items(), key=lambda kv: kv[1].last_used)
        if now - entry.last_used < self.config.evict_idle_s:
            return
        self._release(sid, self.sessions.pop(sid))
        log.info("session %s idle for %.1f s closed to make room (--max-sessions %d)", sid, now - entry.last_used,
                 self.config.max_sessions)  # fmt: skip

    def _reap_loop(self) -> None:
        interval = min(max(self.config.idle_timeout_s / 4, 0.05), 30.0)
        while not self._stop.wait(interval):
            self.reap()

    # -- helpers -----------------------------------------------------------------------------
    def _stage_info(self, sid: str, stage: StageRunner) -> pb.StageInfo:
        device = str(getattr(stage, "device", "cpu"))
        return pb.StageInfo(stage_id=sid, start=stage.start, end=stage.end, param_bytes=stage.param_bytes(), device=device,
                            format=stage.format)  # fmt: skip

    def _entry(self, session: str) -> tuple[_SessionEntry, StageRunner]:
        with self._lock:
            entry = self.sessions.get(session)
            if entry is None:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"session: unknown session {session!r}; create it first")
            entry.last_used = time.monotonic()
            stage = self.stages.get(entry.stage_id)
        if stage is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"session {session!r}: its stage {entry.stage_id} was unloaded")
        return entry, stage

    def _dtype_of(self, stage: StageRunner) -> torch.dtype:
        dtype = self._dtypes.get(id(stage))
        if dtype is None:
            dtype = stage.io_dtype
            self._dtypes[id(stage)] = dtype
        return dtype

    def _forward(self, req: pb.ForwardRequest) -> pb.ForwardReply:
        t0 = time.monotonic_ns()
        entry, stage = self._entry(req.session)
        limit = self.max_tensor_bytes
        try:
            data = from_proto(req.data, field="data", max_bytes=limit)
            mask = from_proto(req.attention_mask, field="attention_mask", max_bytes=limit) if req.HasField("attention_mask") else None
        except SpecError as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        hidden = 0 if stage.is_first else int(stage.config.hidden_size)
        check_input(stage.is_first, hidden, self._dtype_of(stage), self.vocab_size, data, mask)
        data = data.to(torch.long) if stage.is_first else data
        chunks = check_packed(req, data, self.packed) if len(req.seqs) else None
        t_in = time.monotonic_ns()
        with self._compute:
            if chunks is None:
                out, kv = self._step_batch(req, entry, stage, data, mask)
            else:
                out, kv = self._step_packed(req, entry, stage, data, chunks)
            result = out.data
            top1 = req.top1 and out.is_logits
            if top1:
                result = result[:, -1, :].argmax(dim=-1)
        t_out = time.monotonic_ns()
        reply = pb.ForwardReply(
            session=req.session, data=to_proto(result), is_logits=out.is_logits and not top1, is_top1=top1,
            seq=req.seq, t_in_ns=t_in, t_out_ns=t_out, decode_ns=t_in - t0, kv_cache_bytes=kv,
        )  # fmt: skip
        reply.encode_ns = time.monotonic_ns() - t_out
        return reply

    def _run(self, stage: StageRunner, msg: StageInput) -> StageOutput:
        t_step = time.perf_counter()
        try:
            out = stage.step(msg)
        except ExecutorError as exc:  # StageRunner's own checks on the message
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        self.throttle.after_step(time.perf_counter() - t_step, starts_clock=not msg.session.startswith(PROBE_PREFIX))
        return out

    def _step_batch(self, req: pb.ForwardRequest, entry: _SessionEntry, stage: StageRunner, data: torch.Tensor,
                    mask: torch.Tensor | None) -> tuple[StageOutput, int]:  # fmt: skip
        """A batch step of one session (compute lock held); the output and the session's KV bytes."""
        if entry.seqs is not None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"session {req.session!r} runs packed steps (seqs); "
                          "a batch step needs a session of its own")  # fmt: skip
        if not req.prefill and req.session not in stage.sessions():
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"session {req.session!r}: the first step must be a prefill")
        batch, tokens = int(data.shape[0]), int(data.shape[1])
        check_batch_positions(req.session, req.prefill, batch, tokens, seen=entry.seen, prefilled_batch=entry.batch,
                              max_batch=self.config.max_batch, max_positions=self.max_positions)  # fmt: skip
        out = self._run(stage, StageInput(req.session, data, mask, req.prefill, req.all_logits))
        entry.batch, entry.seen = batch, (0 if req.prefill else entry.seen) + tokens
        return out, stage.cache_bytes(req.session)

    def _step_packed(self, req: pb.ForwardRequest, entry: _SessionEntry, stage: StageRunner, data: torch.Tensor,
                     chunks: tuple[SeqChunk, ...]) -> tuple[StageOutput, int]:  # fmt: skip
        """A packed step of one session's sequences (compute lock held); the output and the KV bytes its live
        sequences' buffers hold."""
        if entry.seqs is None and entry.batch:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"session {req.session!r} runs batch steps; "
                          "a packed step (seqs) needs a session of its own")  # fmt: skip
        after = admit_packed(req.session, chunks, entry.seqs or {}, self.packed)
        keyed = tuple(SeqChunk(seq_key(req.session, c.seq), c.tokens, c.start, c.logits) for c in chunks)
        try:
            out = self._run(stage, StageInput(req.session, data, seqs=keyed, exact=req.exact))
        except BaseException:
            for c in keyed:  # the step's new sequences hold nothing the session knows of
                if c.start:
                    stage.end_session(c.seq)
            raise
        entry.seqs = after
        return out, sum(stage.cache_bytes(seq_key(req.session, seq)) for seq in after)

    # -- the service ---------------------------------------------------------------------------
    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        with self._lock:
            stages = [self._stage_info(sid, st) for sid, st in self.stages.items()]
            n = len(self.sessions)
        return pb.HealthReply(
            status="serving", stages=stages, sessions=n, max_sessions=self.config.max_sessions,
            clock_ns=time.monotonic_ns(), version=_VERSION, max_seqs=self.packed.max_seqs,
            max_step_tokens=self.packed.max_step_tokens,
        )  # fmt: skip

    def LoadStage(self, request: pb.LoadStageRequest, context: grpc.ServicerContext) -> pb.LoadStageReply:
        return _guard(context, lambda: self._load_stage(request))

    def _load_stage(self, request: pb.LoadStageRequest) -> pb.LoadStageReply:
        n = len(self.units)
        if not 0 <= request.start < request.end <= n:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"start/end: unit range [{request.start}, {request.end}) is not inside this model's [0, {n})",
            )
        try:
            device = parse_device(request.device, field="device") if request.device else self.default_device
        except SpecError as exc:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        fmt = request.format or "float32"
        wrong = format_problem(fmt, device.type)
        if wrong:
            code = grpc.StatusCode.INVALID_ARGUMENT if fmt not in FORMATS else grpc.StatusCode.FAILED_PRECONDITION
            raise Refused(code, f"format: {wrong}")
        sid = f"{request.start}-{request.end}@{device}" + ("" if fmt == "float32" else f"/{fmt}")
        t0 = time.perf_counter()
        with self._load:
            with self._lock:
                stage = self.stages.get(sid)
            if stage is None:
                self._evict_for_one_more()
                try:
                    stage = make_stage(self.model_dir, request.start, request.end, name=request.name or sid, device=device,
                                       format=fmt)  # fmt: skip
                    warm_up(stage)
                except ModelError as exc:
                    raise Refused(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
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
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"start/end: this worker holds {len(self.stages)} stages with open sessions, its limit (--max-stages)",
                )

    def UnloadStage(self, request: pb.UnloadStageRequest, context: grpc.ServicerContext) -> pb.UnloadStageReply:
        def run() -> pb.UnloadStageReply:
            with self._lock:
                if self.stages.pop(request.stage_id, None) is None:
                    raise Refused(grpc.StatusCode.NOT_FOUND, f"stage_id: no stage {request.stage_id!r} is loaded")
                gone = [s for s, e in self.sessions.items() if e.stage_id == request.stage_id]
                for s in gone:
                    del self.sessions[s]
            return pb.UnloadStageReply(closed_sessions=len(gone))

        return _guard(context, run)

    def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.ServicerContext) -> pb.CreateSessionReply:
        def run() -> pb.CreateSessionReply:
            check_id(request.session, "session")
            self.reap()
            with self._lock:
                if request.stage_id not in self.stages:
                    raise Refused(grpc.StatusCode.NOT_FOUND, f"stage_id: no stage {request.stage_id!r} is loaded; call LoadStage")
                if request.session in self.sessions:
                    raise Refused(grpc.StatusCode.ALREADY_EXISTS, f"session: {request.session!r} already exists")
                if len(self.sessions) >= self.config.max_sessions:
                    self._evict_idlest_session()
                if len(self.sessions) >= self.config.max_sessions:
                    raise Refused(
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
            if len(request.seqs):
                return self._close_seqs(request)
            with self._lock:
                entry = self.sessions.pop(request.session, None)
                if entry is None:
                    raise Refused(grpc.StatusCode.NOT_FOUND, f"session: unknown session {request.session!r}")
            return pb.CloseSessionReply(kv_cache_bytes=self._release(request.session, entry))

        return _guard(context, run)

    def _close_seqs(self, request: pb.CloseSessionRequest) -> pb.CloseSessionReply:
        """Free some sequences of a packed session (not during one of its steps); the session stays open."""
        seqs = list(dict.fromkeys(request.seqs))
        if len(seqs) > self.packed.max_seqs:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"seqs: {len(seqs)} sequences to free, more than a session "
                          f"holds ({self.packed.max_seqs}, --max-seqs)")  # fmt: skip
        with self._compute:
            with self._lock:
                entry = self.sessions.get(request.session)
            if entry is None:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"session: unknown session {request.session!r}")
            live = entry.seqs or {}
            unknown = [q for q in seqs if q not in live]
            if unknown:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"seqs: {len(unknown)} of {len(seqs)} sequences are not live in "
                              f"session {request.session!r} (first: {unknown[0][:40]!r}); nothing freed")  # fmt: skip
            kv = self._release(request.session, entry, seqs)
            for q in seqs:
                del live[q]
            entry.last_used = time.monotonic()
        return pb.CloseSessionReply(kv_cache_bytes=kv)

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
    except (Refused, ProbeRefused) as exc:
        context.abort(exc.code, str(exc))
    except Exception as exc:  # noqa: BLE001 - logged here, one line to the caller
        ref = uuid.uuid4().hex[:12]
        log.error("error %s serving %s", ref, context.peer(), exc_info=True)
        first = (str(exc).splitlines() or [""])[0][:200]
        context.set_trailing_metadata(((ERROR_ID_KEY, ref),))
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {first} (worker error {ref}, see its log)")
