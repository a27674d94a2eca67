"""The ring's wire format: header layout, flags, and :class:`Ring`, which moves messages.

Rank 0 is the coordinator, rank ``k + 1`` holds stage ``k``. Every message goes
around the ring ``0 -> 1 -> ... -> S -> 0`` as point-to-point ``send``/``recv``
on a c10d process group: first a fixed-size int64 *header*, then the tensors it
describes. The header carries the operation, the session, flags, dtype and shape
of the data, and per stage four slots that each stage fills on the way (see
:func:`slot`). A stage's error travels as an ``ERROR`` message carrying its
traceback (bytes in a uint8 tensor). Nothing received is unpickled. Setting up the
process groups and the worker loop live in :mod:`noodle.executors.torchdist`.
"""

from __future__ import annotations

import datetime
import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "OP_STEP", "OP_LOAD", "OP_END", "OP_SHUTDOWN", "OP_ERROR", "OP_PING", "F_PREFILL", "F_ALL_LOGITS", "F_TOP1",
    "F_MASK", "F_LOGITS", "Ring", "header_len", "slot", "units_hash", "dtype_code", "payload_bytes",
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


def payload_bytes(ring: Ring, data: torch.Tensor, mask: torch.Tensor | None) -> int:
    """Bytes of the big payload :meth:`Ring.send_data` will add (0 when the data fits inline)."""
    total = _align8(data.numel() * data.element_size()) + (mask.numel() * 8 if mask is not None else 0)
    return 0 if total <= ring.inline_bytes else total
