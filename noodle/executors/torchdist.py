"""The torch.distributed ring: process groups, joining the world, and the worker loop.

Rank 0 is the coordinator, rank ``k + 1`` holds stage ``k``. Every message goes
around the ring ``0 -> 1 -> ... -> S -> 0`` as point-to-point ``send``/``recv``
on a c10d process group (Gloo on CPUs, NCCL when every rank has a GPU): first a
fixed-size int64 *header*, then the tensors it describes. The header carries the
operation, the session, flags, dtype and shape of the data, and per stage four
slots that each stage fills on the way (``t_in``/``t_out`` timestamps on its
monotonic clock, KV-cache bytes, bytes sent on), so the coordinator learns every stage's
compute time and every hop's transit from the one message that comes back.

A stage that fails turns the message into an ``ERROR`` carrying its traceback
(bytes in a uint8 tensor) and the rest of the ring passes it on: the coordinator
re-raises it, and the ring stays in step. Nothing received is unpickled.

The header (:class:`~noodle.executors.ring.RingHeader`) and
:class:`~noodle.executors.ring.Ring` (tensor transfer) live in :mod:`noodle.executors.ring`.

``run_worker`` is what ``noodle worker --backend torchrpc`` and the processes the
coordinator spawns run; it reads ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK`` and
``WORLD_SIZE`` like ``torchrun`` sets them.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from noodle.errors import ExecutorError, SpecError
from noodle.executors.ring import Flag, Op, Ring, StepSlot, payload_bytes, units_hash

__all__ = ["world_from_env", "make_group", "open_ring", "run_worker", "short_error", "wait_ready"]


def world_from_env() -> tuple[str, int, int, int]:
    """``(MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)``, checked."""
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if not os.environ.get(k)]
    if missing:
        raise SpecError(f"torchrpc worker: set {', '.join(missing)} (as torchrun does) to join the coordinator's world")
    try:
        port, rank, world = int(os.environ["MASTER_PORT"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise SpecError("torchrpc worker: MASTER_PORT, RANK and WORLD_SIZE must be integers") from None
    if world < 2 or not 0 <= rank < world:
        raise SpecError(f"torchrpc worker: RANK {rank} does not fit WORLD_SIZE {world} (rank 0 is the coordinator)")
    return os.environ["MASTER_ADDR"], port, rank, world


def make_group(store: Any, rank: int, world: int, backend: str, timeout_s: float, host: str | None) -> Any:
    """A Gloo or NCCL process group of our own (the global default group is left alone)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    gloo = dist.ProcessGroupGloo
    if host:
        device = gloo.create_device(hostname=host)
    elif os.environ.get("GLOO_SOCKET_IFNAME"):
        device = gloo.create_device(interface=os.environ["GLOO_SOCKET_IFNAME"].split(",")[0])
    else:
        device = gloo.create_default_device()  # the address this machine's hostname resolves to
    opts._devices = [device]
    # One Gloo worker thread: point-to-point ops do not use the pool, and with the default two a
    # 768-float round trip took ~4 ms p50 here (2 cores, busy) against ~0.25 ms with one.
    opts._threads = 1
    return dist.ProcessGroupGloo(store, rank, world, opts)


def short_error(exc: BaseException) -> str:
    """The first sentence of a c10d/Gloo error, without its source path and advice."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". This is typically")[0]


def wait_ready(store: Any, world: int, procs: Sequence[Any], timeout_s: float) -> None:
    """Wait until ranks ``1..world-1`` said ready in ``store``; a spawned one that exits first is an error."""
    keys = [f"ready/{r}" for r in range(1, world)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        for rank, proc in enumerate(procs, 1):
            if proc.poll() is not None:
                raise ExecutorError(f"torchrpc: worker rank {rank} exited with code {proc.returncode} while starting",
                                    remote_traceback=proc.log_text()[-4000:] or None)  # fmt: skip
        if time.monotonic() > deadline:
            missing = [k.split("/")[1] for k in keys if not store.check([k])]
            raise ExecutorError(
                f"torchrpc: rank(s) {', '.join(missing)} did not join within {timeout_s:g} s; start "
                "`noodle worker --backend torchrpc` there with the same MASTER_ADDR/MASTER_PORT and WORLD_SIZE"
            )
        time.sleep(0.05)


def _report_lost(ring: Ring, text: str) -> None:
    head = ring.header(Op.ERROR, rank=ring.prev, lost=True)  # a peer was lost, not a stage error
    try:  # the next rank may be gone or have given up too: do not wait for it long
        ring.send_error(head, text, ring.next, timeout_s=5.0)
    except RuntimeError:
        pass


def open_ring(store: Any, rank: int, world: int, backend: str, timeout_s: float, host: str | None,
              device: torch.device, inline_bytes: int) -> Ring:  # fmt: skip
    """Both process groups of the ring on ``store`` (``small`` for messages, ``big`` for payloads)."""
    import torch.distributed as dist

    small = make_group(dist.PrefixStore("small", store), rank, world, backend, timeout_s, host)
    big = make_group(dist.PrefixStore("big", store), rank, world, backend, timeout_s, host)
    return Ring(small, big, rank, world, device, 0 if backend == "nccl" else inline_bytes)


def _parent_watch(parent: int) -> None:
    """Exit when the spawning coordinator is gone (spawned workers only)."""
    while True:
        time.sleep(0.5)
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            os._exit(3)
        except PermissionError:
            pass


def run_worker(model_dir: str | Path, *, device: str = "cpu", backend: str = "gloo", timeout_s: float = 1800.0,
               host: str | None = None, threads: int = 0, join: tuple[str, int, int, int] | None = None,
               parent_pid: int | None = None) -> int:  # fmt: skip
    """Join the world, serve one stage until ``SHUTDOWN``; returns an exit code.

    ``join`` is ``(MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)``, read from the environment
    when not given; ``parent_pid`` makes a spawned worker exit when its coordinator is gone.
    """
    import torch.distributed as dist

    from noodle.executors.devices import make_stage, parse_device, warm_up
    from noodle.executors.messages import StageInput
    from noodle.executors.slicing import unit_names_of

    if threads:
        torch.set_num_threads(threads)
    if parent_pid:
        threading.Thread(target=_parent_watch, args=(parent_pid,), daemon=True).start()
    addr, port, rank, world = join or world_from_env()
    if rank == 0:
        raise SpecError("torchrpc worker: RANK 0 is the coordinator (`noodle exec --backend torchrpc`); workers are 1..N")
    dev = parse_device(device, field="--device")
    comm = dev if backend == "nccl" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # workers are never the store's master, under torchrun (agent store) or not
    tcp = dist.TCPStore(addr, port, world, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    store = dist.PrefixStore("noodle", tcp)
    units = unit_names_of(model_dir)
    store.set(f"ready/{rank}", str(os.getpid()))
    inline = int(store.get("inline_bytes"))  # set by the coordinator: one decode step of the planned batch
    ring = open_ring(store, rank, world, backend, timeout_s, host, comm, inline)
    k = rank - 1
    stage = None
    while True:
        try:
            head, buf = ring.recv(ring.prev)
        except RuntimeError as exc:  # the previous rank is gone: say so downstream if we can, then leave
            _report_lost(ring, f"rank {rank} lost its connection to rank {ring.prev} ({short_error(exc)})")
            return 4
        except SpecError as exc:  # a header this worker cannot read: the ring is out of step
            ring.send_error(ring.header(Op.ERROR, rank=rank), f"rank {rank} (stage {k}): {exc}", ring.next)
            continue
        if head.op == Op.ERROR:
            ring.forward_error(head, buf, ring.prev, ring.next)
            continue
        if head.op == Op.SHUTDOWN:
            ring.send(head, ring.next)
            return 0
        try:
            if head.op == Op.STEP:
                data, mask = ring.recv_data(head, buf, ring.prev)
                if stage is None:
                    raise ExecutorError(f"rank {rank}: a step arrived before its stage was loaded")
                flags = head.flags
                msg = StageInput(f"s{head.session}", data, mask, bool(flags & Flag.PREFILL), bool(flags & Flag.ALL_LOGITS))
                t_in = time.monotonic_ns()
                out = stage.step(msg)
                result = out.data
                if flags & Flag.TOP1 and out.is_logits:
                    result = result[:, -1, :].argmax(dim=-1)
                elif out.is_logits:
                    flags |= Flag.LOGITS
                kv_bytes = stage.cache_bytes(msg.session)
                t_out = time.monotonic_ns()
                nxt = ring.next
                size = ring.msg_bytes + payload_bytes(ring, result, mask if nxt != 0 else None)
                head = replace(head, flags=flags).with_slot(k, StepSlot(t_in, t_out, kv_bytes, size))
                ring.send_data(head, result if comm.type == "cuda" else result.cpu(), mask, nxt)
            elif head.op == Op.END:
                if stage is not None:
                    stage.end_session(f"s{head.session}")
                ring.send(head, ring.next)
            elif head.op == Op.PING:
                ring.send(head.with_slot(k, StepSlot(t_in=time.monotonic_ns())), ring.next)
            elif head.op == Op.LOAD:
                if head.units_hash != units_hash(units):
                    raise SpecError(
                        f"rank {rank}: the model at {model_dir} has other units than the plan "
                        f"({len(units)} units); start the worker with the plan's model folder"
                    )
                want = head.load_slot(k)
                stage_dev = dev if want.device < 0 else parse_device(f"cuda:{want.device}", field="plan device")
                stage = make_stage(model_dir, want.start, want.end, name=f"rank{rank}", device=stage_dev)
                warm_up(stage)
                ring.send(head.with_slot(k, replace(want, param_bytes=stage.param_bytes())), ring.next)
            else:
                raise ExecutorError(f"rank {rank}: unexpected operation {head.op.name} in a header")
        except Exception:  # noqa: BLE001 - travels to the coordinator with its traceback
            ring.send_error(replace(head, rank=rank), f"rank {rank} (stage {k}):\n{traceback.format_exc()}", ring.next)
