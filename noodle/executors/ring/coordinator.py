"""``torchrpc``: the ring's coordinator, rank 0, with one worker process per stage on torch.distributed.

Data path: pure c10d point-to-point, no ``torch.distributed.rpc``. Measured on
this machine (torch 2.13 CPU, loopback, 1x1x768 tensor): an ``rpc_sync`` round
trip 440-615 us, a Gloo ``send``/``recv`` round trip 118-226 us, a 3-hop ring
176-315 us. RPC is also in maintenance mode and executes pickled callables sent
by peers (CVE-2024-5480 was remote code execution through it). So every message,
control included, is an int64 header with the data inline, passed around the ring
``coordinator -> stage 0 -> ... -> stage S-1 -> coordinator``
(:mod:`~noodle.executors.ring.transport`): activations go from stage to stage, once.
The process groups are our own objects on a ``TCPStore``, not the global default
group, so several executors can live in one process. With CUDA on every rank and
stage the groups are NCCL and tensors stay on the devices; otherwise Gloo carries
CPU tensors.

Failures: torch.distributed cannot survive a lost rank. A process group is fixed
at creation; after a peer dies every ``send``/``recv`` with it fails or times out,
and no new process can take its place. Instead, with workers it spawned itself,
the executor tears the world down, respawns it on a new port, reloads the stages,
replays the session's steps and goes on with the same tokens (``restarts`` times
at most); with workers started elsewhere (``noodle worker --backend torchrpc``,
torchrun) it raises an :class:`~noodle.errors.ExecutorError` naming the lost rank
within the deadline, aborts its groups, and leaves nothing hanging.

The ports (``MASTER_PORT`` and Gloo's) take unauthenticated connections: keep
them on a trusted network or a VPN.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from noodle.errors import ExecutorError, SpecError
from noodle.executors.base import ClosesOnExit, RunResult, check_formats, check_plan, check_workload
from noodle.executors.devices import gpu_indices, ring_backend
from noodle.formats import FORMATS
from noodle.executors.failover import RetryPolicy
from noodle.executors.generation import Sampling, generate, token_ids_of
from noodle.executors.messages import StageInput
from noodle.executors.netreport import FailoverEvent, TraceBook
from noodle.executors.remote import (
    one_hot_logits,
    ring_offsets,
    ring_trace,
    units_label,
)
from noodle.executors.ring.lanes import ring_pipeline
from noodle.executors.ring.transport import NO_REPLACEMENT, Ring, open_ring, short_error, wait_ready, world_from_env
from noodle.executors.ring.wire import CHUNK_WORDS, Flag, LoadSlot, Op, RingHeader, step_flags, units_hash
from noodle.executors.ring.worker import run_worker
from noodle.executors.scheduler import Pipeline
from noodle.executors.slicing import read_config, unit_names_of
from noodle.executors.spawner import WorkerProcess
from noodle.plandoc import PlanDoc

__all__ = ["TorchRpcExecutor"]


class _Lost(Exception):
    """The ring broke: a rank died, hung, or the network dropped."""


class TorchRpcExecutor(ClosesOnExit):
    """Runs each stage of ``plan`` in its own process on a torch.distributed ring.

    Args:
        plan: the plan document.
        model_dir: the model folder (every worker loads its own stage from its own copy).
        spawn: start the workers here (default unless ``WORLD_SIZE`` is set, which means
            joining a world of ``noodle worker --backend torchrpc`` processes as rank 0).
        backend: ``auto`` (spawned: NCCL when every rank and stage has a GPU, else Gloo; joined:
            ``$NOODLE_DIST_BACKEND`` or Gloo, matching the workers' ``--dist-backend``), ``gloo`` or ``nccl``.
        policy: ``step_timeout_s`` bounds each step (and the ring's recv); ``attempts``/``backoff_s`` unused here.
        restarts: spawned worlds rebuilt after a lost rank before giving up.
        threads: torch threads per spawned worker (0: this machine's cores shared out).
        host: address the spawned world listens on.
    """

    name = "torchrpc"

    def __init__(
        self,
        plan: PlanDoc,
        model_dir: str | Path,
        *,
        emulate: bool = False,
        spawn: bool | None = None,
        backend: str = "auto",
        policy: RetryPolicy | None = None,
        restarts: int = 1,
        threads: int = 0,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 300.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if emulate:
            raise SpecError("--emulate: the torchrpc backend measures real processes; emulation is for --backend local")
        if backend not in ("auto", "gloo", "nccl"):
            raise SpecError(f"torchrpc backend: {backend!r}; use auto, gloo or nccl")
        self.plan = plan
        self.model_dir = Path(model_dir)
        config = read_config(self.model_dir)
        self.config = config
        self.units = unit_names_of(self.model_dir)
        check_plan(plan, self.units)
        (self.eos_token_id, self.pad_token_id), self.vocab_size = token_ids_of(config), int(config.vocab_size)
        self.spawn = ("WORLD_SIZE" not in os.environ) if spawn is None else spawn
        self.policy, self.restarts, self.host, self.startup_timeout_s = policy or RetryPolicy(), restarts, host, startup_timeout_s
        self._log = log or logging.getLogger(__name__).warning
        n = len(plan.stages)
        self.world = n + 1
        self.threads = threads or max(1, (os.cpu_count() or 1) // n)
        self.devices = gpu_indices([s.device for s in plan.stages], reserve_first=True) if self.spawn else [-1] * n
        if self.spawn:
            check_formats(plan, "torchrpc", devices=["cuda" if d >= 0 else "cpu" for d in self.devices])
        # one decode step of the planned batch (with its mask, or a packed step's chunk table) travels inside its message
        batch = int(plan.workload.get("batch_size", 1) or 1)
        self.inline_bytes = batch * int(config.hidden_size) * 4 + batch * 8 * CHUNK_WORDS + 8
        self._sent = 0
        if backend == "auto" and not self.spawn:  # workers started elsewhere: say which with NOODLE_DIST_BACKEND
            backend = os.environ.get("NOODLE_DIST_BACKEND", "gloo")
        if self.spawn:
            self.backend, self.backend_reason = ring_backend(backend, self.devices, nccl_available=dist.is_nccl_available())
        else:
            self.backend, self.backend_reason = backend, f"{backend}: the workers' --dist-backend"
        self._procs: list[WorkerProcess] = []
        self._ring: Ring | None = None
        self._store: Any = None  # the TCPStore: kept alive as long as the ring
        self._sessions = itertools.count(1)
        self.param_bytes, self.offsets = [0] * n, [0] * n  # offsets: worker clock - coordinator clock (ns)
        self.ping_ms: float | None = None
        self.failovers: list[FailoverEvent] = []

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> TorchRpcExecutor:
        if self._ring is None:
            logging.getLogger(__name__).info("torchrpc data path: %s", self.backend_reason)
            try:
                self._start()
            except _Lost as exc:
                lost = self._lost_ranks()
                self.close()
                raise ExecutorError(f"torchrpc: the ring broke while loading the stages ({exc}); {lost}") from None
            except BaseException:
                self.close()
                raise
        return self

    def _start(self) -> None:
        timeout = datetime.timedelta(seconds=self.startup_timeout_s)
        if self.spawn:
            master = dist.TCPStore(self.host, 0, self.world, is_master=True, wait_for_workers=False, timeout=timeout)
            self._spawn(master.port)
            host = self.host
        else:
            addr, port, rank, world = world_from_env()
            if rank != 0 or world != self.world:
                raise SpecError(
                    f"torchrpc: the coordinator must be RANK 0 of WORLD_SIZE {self.world} (1 + {self.world - 1} stages); "
                    f"got RANK {rank}, WORLD_SIZE {world}"
                )
            agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            master = dist.TCPStore(addr, port, world, is_master=not agent, timeout=timeout)
            host = None
        self._store = master
        store = dist.PrefixStore("noodle", master)
        store.set("inline_bytes", str(self.inline_bytes))
        wait_ready(store, self.world, self._procs, self.startup_timeout_s)
        comm = torch.device("cuda", 0) if self.backend == "nccl" else torch.device("cpu")
        self._ring = open_ring(store, 0, self.world, self.backend, self.policy.step_timeout_s * 4, host, comm,
                               self.inline_bytes)  # fmt: skip
        self._load()

    def _spawn(self, port: int) -> None:
        from noodle.executors.spawner import spawn

        preload = [type(read_config(self.model_dir)).__module__.replace("configuration_", "modeling_")]
        for rank in range(1, self.world):
            device = "cpu" if self.devices[rank - 1] < 0 else f"cuda:{self.devices[rank - 1]}"
            self._procs.append(
                spawn(run_worker, str(self.model_dir), device=device, backend=self.backend, host=self.host,
                      threads=self.threads, timeout_s=self.policy.step_timeout_s * 4, preload=preload,
                      join=(self.host, port, rank, self.world), parent_pid=os.getpid())  # fmt: skip
            )

    def _live_ring(self) -> Ring:
        if self._ring is None:
            raise ExecutorError("torchrpc: the ring is not open (executor closed or not entered as a context manager)")
        return self._ring

    def _load(self) -> None:
        ring = self._live_ring()
        slots = tuple(LoadSlot(st.start, st.end, self.devices[k], format=FORMATS.index(st.format))
                      for k, st in enumerate(self.plan.stages))
        back = self._roundtrip(RingHeader(Op.LOAD, units_hash=units_hash(self.units), slots=slots), self.startup_timeout_s)
        self.param_bytes = [back.load_slot(k).param_bytes for k in range(len(self.plan.stages))]
        pings = []  # (round trip, sent, stamps): the fastest gives the ring's ping and the clock offsets
        for _ in range(5):
            t0 = time.monotonic_ns()
            got = self._roundtrip(ring.header(Op.PING), self.policy.step_timeout_s)
            t1 = time.monotonic_ns()
            pings.append((t1 - t0, t0, [got.step_slot(k).t_in for k in range(len(self.plan.stages))]))
        rtt, sent, stamps = min(pings)
        self.ping_ms = rtt / 1e6
        self.offsets = [0] * len(stamps) if self.spawn else ring_offsets(sent, sent + rtt, stamps)

    def _roundtrip(self, head: RingHeader, timeout_s: float) -> RingHeader:
        """Send a data-less message around the ring and return its header (raising a stage's error)."""
        ring = self._live_ring()
        try:
            ring.send(head, 1)
            back, _ = ring.recv(self.world - 1, timeout_s)
            if back.op == Op.ERROR:
                raise self._remote_error(back)
        except RuntimeError as exc:
            raise _Lost(short_error(exc)) from None
        return back

    def _node(self, rank: int) -> str:
        return self.plan.stages[rank - 1].node if 1 <= rank < self.world else "the coordinator"

    def _remote_error(self, head: RingHeader) -> Exception:
        text = self._live_ring().recv_error(head, self.world - 1, self.policy.step_timeout_s)
        rank = head.rank
        node = self._node(rank)
        if head.lost:
            return _Lost(f"{text.strip()}; rank {rank} held {node}")
        first = text.strip().splitlines()[-1] if text.strip() else "error"
        return ExecutorError(f"torchrpc: stage on {node} (rank {rank}) failed: {first}", remote_traceback=text)

    def close(self) -> None:
        ring, self._ring = self._ring, None
        if ring is not None and all(p.poll() is None for p in self._procs):
            try:
                ring.send(ring.header(Op.SHUTDOWN), 1)
                ring.recv(self.world - 1, 5.0)
            except RuntimeError:
                pass
        if ring is not None:
            ring.close()
        self._stop_procs()
        self._store = None

    def _stop_procs(self) -> None:
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            proc.close()
        self._procs = []

    def _kill_world(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            proc.wait(timeout=10)
        if self._ring is not None:
            self._ring.close(abort=True)  # ranks started elsewhere see the ring gone, not a silent peer
        self._ring = None
        self._stop_procs()
        self._store = None

    def _lost_ranks(self, settle_s: float = 1.0) -> str:
        # a killed process closes its sockets a moment before it can be reaped: give it that moment
        deadline = time.monotonic() + settle_s
        while self._procs and all(p.poll() is None for p in self._procs) and time.monotonic() < deadline:
            time.sleep(0.02)
        dead = [f"rank {r} ({self._node(r)}) exited with code {p.returncode}"
                for r, p in enumerate(self._procs, 1) if p.poll() is not None]  # fmt: skip
        return "; ".join(dead) or "every worker process is alive: one hung or the network dropped"

    # -- running ---------------------------------------------------------------------------------
    def _step(self, msg: StageInput, session: int, top1: bool) -> tuple[torch.Tensor, bool, RingHeader, int, int]:
        ring = self._live_ring()
        flags = step_flags(msg) | (Flag.TOP1 if top1 else Flag.NONE)
        start = time.monotonic_ns()
        try:
            self._sent = ring.send_data(ring.header(Op.STEP, session=session, flags=flags), msg.data, msg.attention_mask, 1)
        except RuntimeError as exc:
            raise _Lost(f"sending to rank 1 ({self._node(1)}): {short_error(exc)}") from None
        try:
            back, got = ring.recv(self.world - 1, self.policy.step_timeout_s)
            if back.op == Op.ERROR:
                raise self._remote_error(back)
            data = ring.recv_data(back, got, self.world - 1, self.policy.step_timeout_s)[0]
        except RuntimeError as exc:
            raise _Lost(f"waiting for the step to come round: {short_error(exc)}") from None
        return data.cpu(), bool(back.flags & Flag.TOP1 and data.dim() == 1), back, start, time.monotonic_ns()

    def _restart(self, reason: str, step: int, history: list[StageInput], session: int, t0: float) -> None:
        lost = self._lost_ranks()
        self._kill_world()
        self._log(f"noodle: torchrpc lost the ring at step {step} ({reason}; {lost}); respawning {self.world - 1} workers")
        try:
            self._start()
            for x in history:
                self._step(x, session, top1=True)
        except _Lost as exc:
            lost = self._lost_ranks()
            self._kill_world()
            raise ExecutorError(f"torchrpc: the respawned ring broke too ({exc}); {lost}") from None
        detail = f"respawned {self.world - 1} workers on a new world and replayed {len(history)} steps"
        self.failovers.append(FailoverEvent(step=step, node=lost, reason=reason, action="restarted", detail=detail,
                                            replayed_steps=len(history), seconds=time.perf_counter() - t0))  # fmt: skip

    def pipeline(self, *, concurrency: int = 1, micro_batch: int = 1, prefill_chunk: int = 0, max_queue: int = 256,
                 batching: str = "groups", max_batch_tokens: int = 256) -> Pipeline:
        """A :class:`~noodle.executors.scheduler.Pipeline` over the ring (see :mod:`~noodle.executors.ring.lanes`)."""
        return ring_pipeline(self, concurrency=concurrency, micro_batch=micro_batch, prefill_chunk=prefill_chunk, max_queue=max_queue,
                             batching=batching, max_batch_tokens=max_batch_tokens)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        keep_logits: bool = False,
        on_step: Callable[[int], None] | None = None,
    ) -> RunResult:
        """Generate up to ``max_new_tokens`` for each prompt; see :class:`~noodle.executors.base.Executor`."""
        if self._ring is None:
            raise ExecutorError("torchrpc executor: use it as a context manager (`with TorchRpcExecutor(...) as ex:`)")
        check_workload(self.plan, prompts, max_new_tokens)
        top1 = sampling.argmax_only and not keep_logits
        book = TraceBook(self.plan, relayed=False)
        first_event = len(self.failovers)
        history: list[StageInput] = []
        session = next(self._sessions)
        restarts_left = self.restarts if self.spawn else 0
        kv = [0] * len(self.plan.stages)

        def forward(msg: StageInput) -> torch.Tensor:
            nonlocal session, restarts_left
            while True:
                t0 = time.perf_counter()
                try:
                    data, is_top1, back, start, done = self._step(msg, session, top1)
                    break
                except _Lost as exc:
                    if restarts_left <= 0:
                        lost = self._lost_ranks() if self.spawn else "a rank died, hung or was cut off"
                        self._kill_world()
                        raise ExecutorError(f"torchrpc: the ring broke at step {len(history) + 1} ({exc}); {lost}. "
                                            f"{NO_REPLACEMENT}") from None
                    restarts_left -= 1
                    session = next(self._sessions)
                    self._restart(str(exc), len(history) + 1, history, session, t0)
                    continue
            history.append(msg)
            logits = one_hot_logits(data, self.vocab_size) if is_top1 else data[:, -1, :]
            done = time.monotonic_ns()
            n = len(self.plan.stages)
            slots = [back.step_slot(k) for k in range(n)]
            t_in = [s.t_in - self.offsets[k] for k, s in enumerate(slots)]
            t_out = [s.t_out - self.offsets[k] for k, s in enumerate(slots)]
            book.add(ring_trace(msg.prefill, start, done, t_in, t_out, [self._sent, *(s.sent_bytes for s in slots)]))
            kv[:] = [s.kv_bytes for s in slots]
            if on_step is not None:
                on_step(len(history))
            return logits

        t0 = time.perf_counter()
        try:
            gen = generate(forward, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                           eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, keep_logits=keep_logits)  # fmt: skip
        finally:
            if self._ring is not None:
                try:  # drop the session's KV caches
                    self._roundtrip(self._ring.header(Op.END, session=session), self.policy.step_timeout_s)
                except (_Lost, ExecutorError):
                    pass
        wall = time.perf_counter() - t0
        book.failovers = self.failovers[first_event:]
        facts = [(units_label(self.plan, k), self.param_bytes[k], kv[k]) for k in range(len(self.plan.stages))]
        report = book.build(backend=self.name, emulated=False, prompts=prompts, n_steps=gen.steps, wall_s=wall,
                            stage_facts=facts, rtt_extra={"ring": (self.ping_ms, 0.0)},
                            data_path=f"c10d point-to-point over {self.backend}, ring coordinator -> stages -> coordinator")  # fmt: skip
        return RunResult(tokens=gen.tokens, report=report, logits=tuple(gen.logits))
