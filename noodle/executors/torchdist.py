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
import math
import os
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from noodle.errors import ExecutorError, SpecError

__all__ = [
    "OP_STEP", "OP_LOAD", "OP_END", "OP_SHUTDOWN", "OP_ERROR", "OP_PING", "F_PREFILL", "F_ALL_LOGITS", "F_TOP1",
    "F_MASK", "F_LOGITS", "Ring", "header_len", "slot", "units_hash", "world_from_env", "make_group", "open_ring",
    "run_worker", "short_error", "wait_ready",
]  # fmt: skip

OP_STEP, OP_LOAD, OP_END, OP_SHUTDOWN, OP_ERROR, OP_PING = 1, 2, 3, 4, 5, 6
F_PREFILL, F_ALL_LOGITS, F_TOP1, F_MASK, F_LOGITS = 1, 2, 4, 8, 16
# header: 0 op, 1 session, 2 flags, 3 dtype, 4 ndim, 5-7 shape, 8-9 mask shape, 10-11 spare, 12 error (or lost) rank,
# 13 units hash, 14 lost-peer flag, 15 bytes of the payload that follows on the second group (0: inline), then
# 4 slots per stage (see slot()).
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


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


class Ring:
    """Messages around the ring: a fixed-size uint8 buffer (int64 header + inline payload), plus big payloads.

    A second small message to the same Gloo peer waits for the first to be
    acknowledged (header then data: 15 ms around a 4-rank ring here; one message:
    0.5 ms), so a step's data travels inside its message when it fits
    ``inline_bytes`` (one decode step of the planned batch); anything larger goes
    as one more message on the second group, ``big`` (another connection).
    NCCL (``inline_bytes == 0``) always sends payloads on ``big``, from the device.
    """

    def __init__(self, small: Any, big: Any, rank: int, world_size: int, device: torch.device, inline_bytes: int) -> None:
        self.small, self.big = small, big
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.hbytes = 8 * header_len(world_size)
        self.inline_bytes = _align8(inline_bytes)
        self.msg_bytes = self.hbytes + self.inline_bytes

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.world_size

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world_size

    def close(self, *, abort: bool = False) -> None:
        """Release both groups; ``abort`` also drops their connections, so blocked peers fail at once."""
        for group in (self.small, self.big):
            try:
                group.abort() if abort else group.shutdown()
            except RuntimeError:
                pass

    def new(self) -> torch.Tensor:
        """A zeroed message buffer (CPU); :meth:`header` is its int64 view."""
        return torch.zeros(self.msg_bytes, dtype=torch.uint8)

    def header(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[: self.hbytes].view(torch.int64)

    @staticmethod
    def _wait(work: Any, timeout_s: float | None) -> None:
        if timeout_s is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=timeout_s))

    def send(self, buf: torch.Tensor, dst: int, extra: torch.Tensor | None = None, timeout_s: float | None = None) -> int:
        """Send a message (and its big payload); returns the bytes sent."""
        self._wait(self.small.send([buf.to(self.device)], dst, 0), timeout_s)
        if extra is None:
            return buf.numel()
        self._wait(self.big.send([extra.to(self.device)], dst, 0), timeout_s)
        return buf.numel() + extra.numel()

    def recv(self, src: int, timeout_s: float | None = None) -> torch.Tensor:
        buf = torch.empty(self.msg_bytes, dtype=torch.uint8, device=self.device)
        self._wait(self.small.recv([buf], src, 0), timeout_s)
        return buf.cpu()

    def _recv_big(self, nbytes: int, src: int, timeout_s: float | None) -> torch.Tensor:
        raw = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._wait(self.big.recv([raw], src, 0), timeout_s)
        return raw

    # -- data and errors -----------------------------------------------------------------------------
    def send_data(self, buf: torch.Tensor, data: torch.Tensor, mask: torch.Tensor | None, dst: int) -> int:
        """Describe ``data`` (and ``mask`` unless sending to the coordinator) in the header and send; returns bytes."""
        hdr = self.header(buf)
        hdr[3], hdr[4] = dtype_code(data.dtype), data.dim()
        hdr[5:8] = 0
        hdr[5 : 5 + data.dim()] = torch.tensor(list(data.shape), dtype=torch.int64)
        send_mask = mask is not None and dst != 0  # the coordinator keeps its own copy of the mask
        hdr[2] = int(hdr[2]) | F_MASK if send_mask else int(hdr[2]) & ~F_MASK
        parts = [data.contiguous().reshape(-1).view(torch.uint8)]
        if send_mask and mask is not None:
            hdr[8], hdr[9] = mask.shape
            parts.append(mask.to(torch.int64).contiguous().reshape(-1).view(torch.uint8))
        total = _align8(parts[0].numel()) + (parts[1].numel() if len(parts) > 1 else 0)
        if total <= self.inline_bytes:
            hdr[15] = 0
            dest, extra = buf[self.hbytes :], None
        else:
            hdr[15] = total
            dest = extra = torch.zeros(total, dtype=torch.uint8, device=data.device)
        dest[: parts[0].numel()].copy_(parts[0])
        if len(parts) > 1:
            off = _align8(parts[0].numel())
            dest[off : off + parts[1].numel()].copy_(parts[1])
        return self.send(buf, dst, extra)

    def recv_data(self, buf: torch.Tensor, src: int, timeout_s: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The data (and mask) a received message carries, inline or as its big payload."""
        hdr = self.header(buf)
        shape = [int(d) for d in hdr[5 : 5 + int(hdr[4])]]
        dtype = _DTYPES[int(hdr[3])]
        big = int(hdr[15])
        raw = self._recv_big(big, src, timeout_s) if big else buf[self.hbytes :]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        data = raw[:nbytes].clone().view(dtype).reshape(shape)
        mask = None
        if int(hdr[2]) & F_MASK:
            off = _align8(nbytes)
            rows, cols = int(hdr[8]), int(hdr[9])
            mask = raw[off : off + rows * cols * 8].clone().view(torch.int64).reshape(rows, cols)
        return data, mask

    def send_error(self, buf: torch.Tensor, text: str, dst: int, timeout_s: float | None = None) -> None:
        raw = torch.frombuffer(bytearray(text.encode()[-60000:] or b"?"), dtype=torch.uint8)
        hdr = self.header(buf)
        hdr[0], hdr[15] = OP_ERROR, raw.numel()
        if int(hdr[12]) == 0:
            hdr[12] = self.rank
        self.send(buf, dst, raw, timeout_s)

    def recv_error(self, buf: torch.Tensor, src: int, timeout_s: float | None = None) -> str:
        raw = self._recv_big(int(self.header(buf)[15]), src, timeout_s)
        return bytes(raw.cpu().numpy().tobytes()).decode(errors="replace")

    def forward_error(self, buf: torch.Tensor, src: int, dst: int) -> None:
        """Pass a stage's error on unchanged."""
        raw = self._recv_big(int(self.header(buf)[15]), src, None)
        self.send(buf, dst, raw)


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
    buf = ring.new()
    hdr = ring.header(buf)
    hdr[12], hdr[14] = ring.prev, 1  # slot 14 = 1: a peer was lost, not a stage error
    try:  # the next rank may be gone or have given up too: do not wait for it long
        ring.send_error(buf, text, ring.next, timeout_s=5.0)
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
            buf = ring.recv(ring.prev)
        except RuntimeError as exc:  # the previous rank is gone: say so downstream if we can, then leave
            _report_lost(ring, f"rank {rank} lost its connection to rank {ring.prev} ({short_error(exc)})")
            return 4
        hdr = ring.header(buf)
        op = int(hdr[0])
        if op == OP_ERROR:
            ring.forward_error(buf, ring.prev, ring.next)
            continue
        if op == OP_SHUTDOWN:
            ring.send(buf, ring.next)
            return 0
        try:
            if op == OP_STEP:
                data, mask = ring.recv_data(buf, ring.prev)
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
                nxt = ring.next
                size = ring.msg_bytes + _payload_bytes(ring, result, mask if nxt != 0 else None)
                hdr[slot(k, 3)] = size
                ring.send_data(buf, result if comm.type == "cuda" else result.cpu(), mask, nxt)
            elif op == OP_END:
                if stage is not None:
                    stage.end_session(f"s{int(hdr[1])}")
                ring.send(buf, ring.next)
            elif op == OP_PING:
                hdr[slot(k, 0)] = time.monotonic_ns()
                ring.send(buf, ring.next)
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
                ring.send(buf, ring.next)
            else:
                raise ExecutorError(f"rank {rank}: unknown operation {op} in a header")
        except Exception:  # noqa: BLE001 - travels to the coordinator with its traceback
            hdr[12] = rank
            ring.send_error(buf, f"rank {rank} (stage {k}):\n{traceback.format_exc()}", ring.next)


def _payload_bytes(ring: Ring, data: torch.Tensor, mask: torch.Tensor | None) -> int:
    """Bytes of the big payload :meth:`Ring.send_data` will add (0 when the data fits inline)."""
    total = _align8(data.numel() * data.element_size()) + (mask.numel() * 8 if mask is not None else 0)
    return 0 if total <= ring.inline_bytes else total
