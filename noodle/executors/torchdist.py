"""The torch.distributed ring: header layout, tensor transfer, and the worker loop.

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

``run_worker`` is what ``noodle worker --backend torchrpc`` and the processes the
coordinator spawns run; it reads ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK`` and
``WORLD_SIZE`` like ``torchrun`` sets them.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from noodle.errors import ExecutorError, NoodleError, SpecError

__all__ = [
    "OP_STEP", "OP_LOAD", "OP_END", "OP_SHUTDOWN", "OP_ERROR", "OP_PING",
    "F_PREFILL", "F_ALL_LOGITS", "F_TOP1", "F_MASK", "F_LOGITS",
    "Ring", "header_len", "slot", "units_hash", "world_from_env", "make_group", "run_worker", "short_error",
]  # fmt: skip

OP_STEP, OP_LOAD, OP_END, OP_SHUTDOWN, OP_ERROR, OP_PING = 1, 2, 3, 4, 5, 6
F_PREFILL, F_ALL_LOGITS, F_TOP1, F_MASK, F_LOGITS = 1, 2, 4, 8, 16
# header: 0 op, 1 session, 2 flags, 3 dtype, 4 ndim, 5-7 shape, 8-9 mask shape, 10 seq,
# 11 error bytes, 12 error rank (or the lost rank), 13 units hash, 14 lost-peer flag, 15 spare, then 4 slots per stage (see slot()).
_BASE = 16
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8]


def header_len(world_size: int) -> int:
    return _BASE + 4 * max(world_size - 1, 1)


def slot(stage: int, k: int) -> int:
    """Header index of stage ``stage``'s slot ``k``.

    0: t_in (LOAD: start), 1: t_out (LOAD: end), 2: KV-cache bytes (LOAD: CUDA index in, param bytes out),
    3: bytes of tensors sent on.
    """
    return _BASE + 4 * stage + k


def units_hash(units: Sequence[str]) -> int:
    """A 62-bit fingerprint of a model's unit names (plans and workers must agree)."""
    return int.from_bytes(hashlib.sha256("\n".join(units).encode()).digest()[:8], "little") >> 2


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype)


class Ring:
    """Sends and receives headers and tensors on a process group, on ``device`` (``cuda`` for NCCL)."""

    def __init__(self, group: Any, rank: int, world_size: int, device: torch.device) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.hlen = header_len(world_size)

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.world_size

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world_size

    def new_header(self) -> torch.Tensor:
        return torch.zeros(self.hlen, dtype=torch.int64)

    def send(self, tensors: Sequence[torch.Tensor], dst: int) -> None:
        for t in tensors:
            t = t.to(self.device).contiguous()
            self.group.send([t], dst, 0).wait()

    def recv_header(self, src: int, timeout_s: float | None = None) -> torch.Tensor:
        buf = torch.zeros(self.hlen, dtype=torch.int64, device=self.device)
        self._recv(buf, src, timeout_s)
        return buf.cpu()

    def recv_tensor(self, src: int, dtype: torch.dtype, shape: Sequence[int], timeout_s: float | None = None) -> torch.Tensor:
        buf = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        self._recv(buf, src, timeout_s)
        return buf

    def _recv(self, buf: torch.Tensor, src: int, timeout_s: float | None) -> None:
        work = self.group.recv([buf], src, 0)
        if timeout_s is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=timeout_s))

    # -- data and errors, as header + tensors ---------------------------------------------------------
    def send_data(self, hdr: torch.Tensor, data: torch.Tensor, mask: torch.Tensor | None, dst: int) -> None:
        hdr[3] = dtype_code(data.dtype)
        hdr[4] = data.dim()
        hdr[5:8] = 0
        hdr[5 : 5 + data.dim()] = torch.tensor(list(data.shape), dtype=torch.int64)
        send_mask = mask is not None and dst != 0  # the coordinator keeps its own copy of the mask
        if mask is not None:
            hdr[8], hdr[9] = mask.shape
        hdr[2] = int(hdr[2]) | F_MASK if mask is not None else int(hdr[2]) & ~F_MASK
        tensors = [data, *([mask.to(torch.int64)] if send_mask and mask is not None else [])]
        self.send([hdr, *tensors], dst)

    def recv_data(self, hdr: torch.Tensor, src: int, timeout_s: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = [int(d) for d in hdr[5 : 5 + int(hdr[4])]]
        data = self.recv_tensor(src, _DTYPES[int(hdr[3])], shape, timeout_s)
        mask = None
        if int(hdr[2]) & F_MASK and self.rank != 0:  # the sender keeps the mask only when sending to rank 0
            mask = self.recv_tensor(src, torch.int64, [int(hdr[8]), int(hdr[9])], timeout_s)
        return data, mask

    def send_error(self, hdr: torch.Tensor, text: str, dst: int) -> None:
        raw = torch.frombuffer(bytearray(text.encode()[-60000:] or b"?"), dtype=torch.uint8)
        hdr[0], hdr[11] = OP_ERROR, raw.numel()
        if int(hdr[12]) == 0:
            hdr[12] = self.rank
        self.send([hdr, raw], dst)

    def recv_error(self, hdr: torch.Tensor, src: int, timeout_s: float | None = None) -> str:
        raw = self.recv_tensor(src, torch.uint8, [int(hdr[11])], timeout_s)
        return bytes(raw.cpu().numpy().tobytes()).decode(errors="replace")


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
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host or "")]
    return dist.ProcessGroupGloo(store, rank, world, opts)


def short_error(exc: BaseException) -> str:
    """The first sentence of a c10d/Gloo error, without its source path and advice."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". This is typically")[0]


def _report_lost(ring: Ring, text: str) -> None:
    hdr = ring.new_header()
    hdr[12], hdr[14] = ring.prev, 1  # slot 14 = 1: a peer was lost, not a stage error
    try:
        ring.send_error(hdr, text, ring.next)
    except RuntimeError:
        pass


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
    ring = Ring(make_group(store, rank, world, backend, timeout_s, host), rank, world, comm)
    k = rank - 1
    stage = None
    while True:
        try:
            hdr = ring.recv_header(ring.prev)
        except RuntimeError as exc:  # the previous rank is gone: say so downstream if we can, then leave
            _report_lost(ring, f"rank {rank} lost its connection to rank {ring.prev} ({short_error(exc)})")
            return 4
        op = int(hdr[0])
        if op == OP_ERROR:
            ring.send([hdr, ring.recv_tensor(ring.prev, torch.uint8, [int(hdr[11])])], ring.next)
            continue
        if op == OP_SHUTDOWN:
            ring.send([hdr], ring.next)
            return 0
        try:
            if op == OP_STEP:
                data, mask = ring.recv_data(hdr, ring.prev)
                if stage is None:
                    raise ExecutorError(f"rank {rank}: a step arrived before its stage was loaded")
                flags = int(hdr[2])
                msg = StageInput(f"s{int(hdr[1])}", data, mask, bool(flags & F_PREFILL), bool(flags & F_ALL_LOGITS))
                hdr[slot(k, 0)] = time.monotonic_ns()
                out = stage.step(msg)
                result = out.data
                if flags & F_TOP1 and out.is_logits:
                    result = result[:, -1, :].argmax(dim=-1)
                elif out.is_logits:
                    hdr[2] = flags | F_LOGITS
                hdr[slot(k, 2)] = stage.cache_bytes(msg.session)
                hdr[slot(k, 1)] = time.monotonic_ns()
                sent = result.numel() * result.element_size()
                if mask is not None and ring.next != 0:
                    sent += mask.numel() * 8
                hdr[slot(k, 3)] = sent
                ring.send_data(hdr, result if comm.type == "cuda" else result.cpu(), mask, ring.next)
            elif op == OP_END:
                if stage is not None:
                    stage.end_session(f"s{int(hdr[1])}")
                ring.send([hdr], ring.next)
            elif op == OP_PING:
                hdr[slot(k, 0)] = time.monotonic_ns()
                ring.send([hdr], ring.next)
            elif op == OP_LOAD:
                if int(hdr[13]) != units_hash(units):
                    raise SpecError(
                        f"rank {rank}: the model at {model_dir} has other units than the plan "
                        f"({len(units)} units); start the worker with the plan's model folder"
                    )
                start, end, want = int(hdr[slot(k, 0)]), int(hdr[slot(k, 1)]), int(hdr[slot(k, 2)])
                stage_dev = dev if want < 0 else parse_device(f"cuda:{want}", field="plan device")
                stage = make_stage(model_dir, start, end, name=f"rank{rank}", device=stage_dev)
                warm_up(stage)
                hdr[slot(k, 2)] = stage.param_bytes()
                ring.send([hdr], ring.next)
            else:
                raise ExecutorError(f"rank {rank}: unknown operation {op} in a header")
        except Exception:  # noqa: BLE001 - travels to the coordinator with its traceback
            hdr[12] = rank
            ring.send_error(hdr, f"rank {rank} (stage {k}):\n{traceback.format_exc()}", ring.next)

