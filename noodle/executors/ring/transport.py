"""The ring's transport: its two c10d process groups and :class:`Ring`, which moves messages.

Rank 0 is the coordinator, rank ``k + 1`` holds stage ``k``. Every message goes
around the ring ``0 -> 1 -> ... -> S -> 0`` as point-to-point ``send``/``recv``
on process groups of our own on a ``TCPStore`` (Gloo on CPUs, NCCL when every rank
has a GPU; the global default group is left alone, so several executors can live in
one process): a :class:`~noodle.executors.ring.wire.RingHeader` with the data inline,
or the data as a second message on another group when it is big. A packed step's chunk
table opens its payload (inline or big alike), so the step still travels as one message. A stage's error
travels as an ``ERROR`` message carrying its traceback (bytes in a uint8 tensor).
Nothing received is unpickled.

Joining the world reads ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK`` and ``WORLD_SIZE``
like ``torchrun`` sets them (:func:`world_from_env`).
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from noodle.errors import ExecutorError, SpecError
from noodle.executors.codec import DTYPES, header_of
from noodle.executors.ring.wire import (
    CHUNK_WORDS,
    Flag,
    LoadSlot,
    Op,
    RingHeader,
    StepSlot,
    WireChunk,
    align8,
    announced_big_bytes,
    chunk_words,
    header_len,
    read_chunks,
)

__all__ = ["Ring", "payload_bytes", "world_from_env", "make_group", "open_ring", "short_error", "wait_ready",
           "NO_REPLACEMENT"]  # fmt: skip

NO_REPLACEMENT = ("torch.distributed cannot replace a lost rank: restart the workers and the run, or use "
                  "--backend grpc with --spare workers to fail over")  # fmt: skip


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
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world, opts)
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # torch binds it in C++ but declares no stub
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


def open_ring(store: Any, rank: int, world: int, backend: str, timeout_s: float, host: str | None,
              device: torch.device, inline_bytes: int) -> Ring:  # fmt: skip
    """Both process groups of the ring on ``store`` (``small`` for messages, ``big`` for payloads)."""
    small = make_group(dist.PrefixStore("small", store), rank, world, backend, timeout_s, host)
    big = make_group(dist.PrefixStore("big", store), rank, world, backend, timeout_s, host)
    return Ring(small, big, rank, world, device, 0 if backend == "nccl" else inline_bytes)


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
        self.inline_bytes = align8(inline_bytes)
        self.msg_bytes = self.hbytes + self.inline_bytes

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.world_size

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world_size

    @property
    def stages(self) -> int:
        return max(self.world_size - 1, 1)

    def header(self, op: Op, **fields: Any) -> RingHeader:
        """A fresh header with one empty slot per stage."""
        slot = LoadSlot() if op == Op.LOAD else StepSlot()
        return RingHeader(op, slots=(slot,) * self.stages, **fields)

    def close(self, *, abort: bool = False) -> None:
        """Release both groups; ``abort`` also drops their connections, so blocked peers fail at once."""
        for group in (self.small, self.big):
            try:
                group.abort() if abort else group.shutdown()
            except RuntimeError:
                pass

    def _buffer(self, head: RingHeader) -> torch.Tensor:
        buf = torch.zeros(self.msg_bytes, dtype=torch.uint8)
        head.write(buf[: self.hbytes].view(torch.int64))
        return buf

    @staticmethod
    def _wait(work: Any, timeout_s: float | None) -> None:
        if timeout_s is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=timeout_s))

    def _send(self, buf: torch.Tensor, dst: int, extra: torch.Tensor | None, timeout_s: float | None) -> int:
        self._wait(self.small.send([buf.to(self.device)], dst, 0), timeout_s)
        if extra is None:
            return buf.numel()
        self._wait(self.big.send([extra.to(self.device)], dst, 0), timeout_s)
        return buf.numel() + extra.numel()

    def send(self, head: RingHeader, dst: int, timeout_s: float | None = None) -> int:
        """Send a message without data; returns the bytes sent."""
        return self._send(self._buffer(replace(head, data=None, mask=None, big_bytes=0, chunks=0)), dst, None, timeout_s)

    def recv(self, src: int, timeout_s: float | None = None) -> tuple[RingHeader, torch.Tensor]:
        """The next message from ``src``: its decoded header and its buffer (for :meth:`recv_data`)."""
        buf = torch.empty(self.msg_bytes, dtype=torch.uint8, device=self.device)
        self._wait(self.small.recv([buf], src, 0), timeout_s)
        buf = buf.cpu()
        words = buf[: self.hbytes].view(torch.int64)
        try:
            return RingHeader.read(words), buf
        except SpecError:
            extra = announced_big_bytes(words)
            if extra:  # take the refused message's payload off the other group: the ring stays in step
                self._recv_big(extra, src, timeout_s)
            raise

    def _recv_big(self, nbytes: int, src: int, timeout_s: float | None) -> torch.Tensor:
        raw = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._wait(self.big.recv([raw], src, 0), timeout_s)
        return raw

    # -- data and errors -----------------------------------------------------------------------------
    def send_data(self, head: RingHeader, data: torch.Tensor, mask: torch.Tensor | None, dst: int,
                  chunks: Sequence[WireChunk] = ()) -> int:  # fmt: skip
        """Send ``head`` describing ``data`` (and ``mask`` unless sending to the coordinator); returns bytes.

        ``chunks`` (a packed step) travel as a table ahead of ``data`` in the same payload.
        """
        send_mask = mask is not None and dst != 0  # the coordinator keeps its own copy of the mask
        parts = [chunk_words(chunks).view(torch.uint8)] if chunks else []
        parts.append(data.contiguous().reshape(-1).view(torch.uint8))
        if send_mask and mask is not None:
            parts.append(mask.to(torch.int64).contiguous().reshape(-1).view(torch.uint8))
        offsets, total = [], 0  # each part starts on an int64 boundary
        for part in parts:
            offsets.append(align8(total))
            total = offsets[-1] + part.numel()
        big = 0 if total <= self.inline_bytes else total
        head = replace(head, data=header_of(data), big_bytes=big, chunks=len(chunks),
                       mask=(int(mask.shape[0]), int(mask.shape[1])) if send_mask and mask is not None else None)  # fmt: skip
        buf = self._buffer(head)
        if big:
            dest = extra = torch.zeros(total, dtype=torch.uint8, device=data.device)
        else:
            dest, extra = buf[self.hbytes :], None
        for off, part in zip(offsets, parts):
            dest[off : off + part.numel()].copy_(part)
        return self._send(buf, dst, extra, None)

    def recv_data(self, head: RingHeader, buf: torch.Tensor, src: int, timeout_s: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[WireChunk, ...]]:  # fmt: skip
        """The data, mask and chunks (a packed step's, else ``()``) a received message carries, inline or big."""
        where = f"ring message from rank {src}"
        if head.data is None:
            raise SpecError(f"{where}: {head.op.name} carries no tensor")
        raw = self._recv_big(head.big_bytes, src, timeout_s) if head.big_bytes else buf[self.hbytes :]
        nbytes = head.data.check(field=where)  # after taking the payload, so a refusal leaves the ring in step
        if head.mask is not None and min(head.mask) < 0:
            raise SpecError(f"{where}: mask shape {list(head.mask)} has a negative dimension")
        table = head.chunks * CHUNK_WORDS * 8
        mask_bytes = head.mask[0] * head.mask[1] * 8 if head.mask is not None else 0
        need = table + (align8(nbytes) + mask_bytes if head.mask is not None else nbytes)
        if need > raw.numel():
            raise SpecError(f"{where}: {need} bytes described, {raw.numel()} carried")
        chunks = read_chunks(raw[:table].clone().view(torch.int64), head, field=where) if head.chunks else ()
        data = raw[table : table + nbytes].clone().view(DTYPES[head.data.dtype]).reshape(head.data.shape)
        mask = None
        if head.mask is not None:
            off = table + align8(nbytes)
            mask = raw[off : off + mask_bytes].clone().view(torch.int64).reshape(head.mask)
        return data, mask, chunks

    def send_error(self, head: RingHeader, text: str, dst: int, timeout_s: float | None = None) -> None:
        raw = torch.frombuffer(bytearray(text.encode()[-60000:] or b"?"), dtype=torch.uint8)
        head = replace(head, op=Op.ERROR, rank=head.rank or self.rank, data=None, mask=None, big_bytes=raw.numel(),
                       flags=Flag.NONE, chunks=0)  # fmt: skip
        self._send(self._buffer(head), dst, raw, timeout_s)

    def recv_error(self, head: RingHeader, src: int, timeout_s: float | None = None) -> str:
        raw = self._recv_big(head.big_bytes, src, timeout_s)
        return bytes(raw.cpu().numpy().tobytes()).decode(errors="replace")

    def forward_error(self, head: RingHeader, buf: torch.Tensor, src: int, dst: int) -> None:
        """Pass a stage's error on unchanged."""
        raw = self._recv_big(head.big_bytes, src, None)
        self._send(buf, dst, raw, None)


def payload_bytes(ring: Ring, data: torch.Tensor, mask: torch.Tensor | None, chunks: int = 0) -> int:
    """Bytes of the big payload :meth:`Ring.send_data` will add (0 when the data fits inline)."""
    table = chunks * CHUNK_WORDS * 8
    total = table + align8(data.numel() * data.element_size()) + (mask.numel() * 8 if mask is not None else 0)
    return 0 if total <= ring.inline_bytes else total
