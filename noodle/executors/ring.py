"""The ring's wire format: a typed header (:class:`RingHeader`) and :class:`Ring`, which moves messages.

Rank 0 is the coordinator, rank ``k + 1`` holds stage ``k``. Every message goes
around the ring ``0 -> 1 -> ... -> S -> 0`` as point-to-point ``send``/``recv``
on a c10d process group: a fixed-size int64 header (a :class:`RingHeader`, written
and read only by :meth:`RingHeader.write` and :meth:`RingHeader.read`), then the
bytes of the tensors it describes (:mod:`~noodle.executors.codec`). Each stage fills
its own :class:`StepSlot` (or :class:`LoadSlot`) on the way. A stage's error travels
as an ``ERROR`` message carrying its traceback (bytes in a uint8 tensor). Nothing
received is unpickled. Setting up the process groups and the worker loop live in
:mod:`noodle.executors.torchdist`.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field, replace
from enum import IntEnum, IntFlag
from typing import Any

import torch

from noodle.errors import SpecError
from noodle.executors.codec import DTYPES, MAX_DIMS, TensorHeader, header_of
from noodle.executors.messages import StageInput

__all__ = ["Op", "Flag", "StepSlot", "LoadSlot", "RingHeader", "Ring", "header_len", "units_hash", "step_flags",
           "payload_bytes"]


class Op(IntEnum):
    """What a message asks of every rank it passes."""

    STEP = 1
    LOAD = 2
    END = 3
    SHUTDOWN = 4
    ERROR = 5
    PING = 6


class Flag(IntFlag):
    """How a ``STEP`` runs (``PREFILL``, ``ALL_LOGITS``, ``TOP1``) and what it carries back (``LOGITS``)."""

    NONE = 0
    PREFILL = 1
    ALL_LOGITS = 2
    TOP1 = 4
    LOGITS = 16


@dataclass(frozen=True)
class StepSlot:
    """What stage ``k`` writes into a ``STEP`` (or ``PING``) on the way: times on its monotonic clock (ns), sizes."""

    t_in: int = 0
    t_out: int = 0
    kv_bytes: int = 0
    sent_bytes: int = 0


@dataclass(frozen=True)
class LoadSlot:
    """Stage ``k`` of a ``LOAD``: its units ``[start, end)``, CUDA index (-1: the worker's device), parameter bytes back."""

    start: int = 0
    end: int = 0
    device: int = -1
    param_bytes: int = 0


# Positions in the int64 header, used by RingHeader.write/read only; then 4 per stage from _BASE.
_OP, _SESSION, _FLAGS, _DTYPE, _NDIM, _SHAPE, _MASK, _RANK, _UNITS, _LOST, _BIG, _BASE = 0, 1, 2, 3, 4, 5, 9, 11, 12, 13, 14, 16
_HAS_MASK = 1 << 40  # in the flags word, beside Flag


def header_len(world_size: int) -> int:
    """int64 words in the header of a ring of ``world_size`` ranks."""
    return _BASE + 4 * max(world_size - 1, 1)


@dataclass(frozen=True)
class RingHeader:
    """One message's header.

    Attributes:
        op: the operation.
        session: the generation the message belongs to (one KV cache per session on every stage).
        flags: :class:`Flag` bits.
        data: dtype and shape of the tensor that follows (``None``: no tensor).
        mask: ``(rows, cols)`` of the int64 padding mask that follows the tensor (``None``: no mask).
        rank: the rank that failed (``ERROR``) or lost its peer.
        units_hash: the plan's :func:`units_hash` (``LOAD``).
        lost: an ``ERROR`` reports a lost peer, not a stage's exception.
        big_bytes: payload bytes that follow on the second group (0: the payload is inline).
        slots: one per stage, filled on the way (:class:`LoadSlot` for ``LOAD``, else :class:`StepSlot`).
    """

    op: Op
    session: int = 0
    flags: Flag = Flag.NONE
    data: TensorHeader | None = None
    mask: tuple[int, int] | None = None
    rank: int = 0
    units_hash: int = 0
    lost: bool = False
    big_bytes: int = 0
    slots: tuple[StepSlot | LoadSlot, ...] = field(default=())

    def with_slot(self, stage: int, slot: StepSlot | LoadSlot) -> RingHeader:
        """This header with stage ``stage``'s slot replaced."""
        slots = list(self.slots)
        slots[stage] = slot
        return replace(self, slots=tuple(slots))

    def step_slot(self, stage: int) -> StepSlot:
        slot = self.slots[stage]
        return slot if isinstance(slot, StepSlot) else StepSlot()

    def load_slot(self, stage: int) -> LoadSlot:
        slot = self.slots[stage]
        return slot if isinstance(slot, LoadSlot) else LoadSlot()

    def write(self, out: torch.Tensor) -> None:
        """Encode into ``out``, an int64 tensor of :func:`header_len` words."""
        words = [0] * out.numel()
        words[_OP], words[_SESSION] = int(self.op), self.session
        words[_FLAGS] = int(self.flags) | (_HAS_MASK if self.mask is not None else 0)
        words[_DTYPE] = -1
        if self.data is not None:
            words[_DTYPE], words[_NDIM] = self.data.code, len(self.data.shape)
            words[_SHAPE : _SHAPE + len(self.data.shape)] = self.data.shape
        if self.mask is not None:
            words[_MASK], words[_MASK + 1] = self.mask
        words[_RANK], words[_UNITS], words[_LOST], words[_BIG] = self.rank, self.units_hash, int(self.lost), self.big_bytes
        for k, slot in enumerate(self.slots):
            words[_BASE + 4 * k : _BASE + 4 * k + 4] = astuple(slot)
        out.copy_(torch.tensor(words, dtype=torch.int64))

    @classmethod
    def read(cls, words_t: torch.Tensor) -> RingHeader:
        """Decode an int64 header tensor (dtype and shape are checked by the codec)."""
        words = words_t.tolist()
        if words[_OP] not in Op._value2member_map_:
            raise SpecError(f"ring header.op: {words[_OP]} is not an operation; expected one of {[int(o) for o in Op]}")
        op = Op(words[_OP])
        data = None
        if words[_DTYPE] >= 0:
            ndim = words[_NDIM]
            if not 1 <= ndim <= MAX_DIMS:
                raise SpecError(f"ring header.shape: {ndim} dimensions, expected 1 to {MAX_DIMS}")
            data = TensorHeader.from_code(words[_DTYPE], tuple(words[_SHAPE : _SHAPE + ndim]), field="ring header")
        flags = words[_FLAGS]
        slot_type = LoadSlot if op == Op.LOAD else StepSlot
        n = (len(words) - _BASE) // 4
        return cls(
            op=op, session=words[_SESSION], flags=Flag(flags & ~_HAS_MASK), data=data,
            mask=(words[_MASK], words[_MASK + 1]) if flags & _HAS_MASK else None, rank=words[_RANK],
            units_hash=words[_UNITS], lost=bool(words[_LOST]), big_bytes=words[_BIG],
            slots=tuple(slot_type(*words[_BASE + 4 * k : _BASE + 4 * k + 4]) for k in range(n)),
        )  # fmt: skip


def step_flags(msg: StageInput) -> Flag:
    """The flags of a ``STEP`` carrying ``msg``."""
    return (Flag.PREFILL if msg.prefill else Flag.NONE) | (Flag.ALL_LOGITS if msg.all_logits else Flag.NONE)


def units_hash(units: Sequence[str]) -> int:
    """A 62-bit fingerprint of a model's unit names (plans and workers must agree)."""
    return int.from_bytes(hashlib.sha256("\n".join(units).encode()).digest()[:8], "little") >> 2


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
        return self._send(self._buffer(replace(head, data=None, mask=None, big_bytes=0)), dst, None, timeout_s)

    def recv(self, src: int, timeout_s: float | None = None) -> tuple[RingHeader, torch.Tensor]:
        """The next message from ``src``: its decoded header and its buffer (for :meth:`recv_data`)."""
        buf = torch.empty(self.msg_bytes, dtype=torch.uint8, device=self.device)
        self._wait(self.small.recv([buf], src, 0), timeout_s)
        buf = buf.cpu()
        return RingHeader.read(buf[: self.hbytes].view(torch.int64)), buf

    def _recv_big(self, nbytes: int, src: int, timeout_s: float | None) -> torch.Tensor:
        raw = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._wait(self.big.recv([raw], src, 0), timeout_s)
        return raw

    # -- data and errors -----------------------------------------------------------------------------
    def send_data(self, head: RingHeader, data: torch.Tensor, mask: torch.Tensor | None, dst: int) -> int:
        """Send ``head`` describing ``data`` (and ``mask`` unless sending to the coordinator); returns bytes."""
        send_mask = mask is not None and dst != 0  # the coordinator keeps its own copy of the mask
        parts = [data.contiguous().reshape(-1).view(torch.uint8)]
        if send_mask and mask is not None:
            parts.append(mask.to(torch.int64).contiguous().reshape(-1).view(torch.uint8))
        total = _align8(parts[0].numel()) + (parts[1].numel() if len(parts) > 1 else 0)
        big = 0 if total <= self.inline_bytes else total
        head = replace(head, data=header_of(data), big_bytes=big,
                       mask=(int(mask.shape[0]), int(mask.shape[1])) if send_mask and mask is not None else None)  # fmt: skip
        buf = self._buffer(head)
        if big:
            dest = extra = torch.zeros(total, dtype=torch.uint8, device=data.device)
        else:
            dest, extra = buf[self.hbytes :], None
        dest[: parts[0].numel()].copy_(parts[0])
        if len(parts) > 1:
            off = _align8(parts[0].numel())
            dest[off : off + parts[1].numel()].copy_(parts[1])
        return self._send(buf, dst, extra, None)

    def recv_data(self, head: RingHeader, buf: torch.Tensor, src: int,
                  timeout_s: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """The data (and mask) a received message carries, inline or as its big payload."""
        if head.data is None:
            raise SpecError(f"ring message from rank {src}: {head.op.name} carries no tensor")
        nbytes = head.data.check(field=f"ring message from rank {src}")
        raw = self._recv_big(head.big_bytes, src, timeout_s) if head.big_bytes else buf[self.hbytes :]
        if head.mask is not None and min(head.mask) < 0:
            raise SpecError(f"ring message from rank {src}: mask shape {list(head.mask)} has a negative dimension")
        mask_bytes = head.mask[0] * head.mask[1] * 8 if head.mask is not None else 0
        need = _align8(nbytes) + mask_bytes if head.mask is not None else nbytes
        if need > raw.numel():
            raise SpecError(f"ring message from rank {src}: {need} bytes described, {raw.numel()} carried")
        data = raw[:nbytes].clone().view(DTYPES[head.data.dtype]).reshape(head.data.shape)
        mask = None
        if head.mask is not None:
            off = _align8(nbytes)
            mask = raw[off : off + mask_bytes].clone().view(torch.int64).reshape(head.mask)
        return data, mask

    def send_error(self, head: RingHeader, text: str, dst: int, timeout_s: float | None = None) -> None:
        raw = torch.frombuffer(bytearray(text.encode()[-60000:] or b"?"), dtype=torch.uint8)
        head = replace(head, op=Op.ERROR, rank=head.rank or self.rank, data=None, mask=None, big_bytes=raw.numel())
        self._send(self._buffer(head), dst, raw, timeout_s)

    def recv_error(self, head: RingHeader, src: int, timeout_s: float | None = None) -> str:
        raw = self._recv_big(head.big_bytes, src, timeout_s)
        return bytes(raw.cpu().numpy().tobytes()).decode(errors="replace")

    def forward_error(self, head: RingHeader, buf: torch.Tensor, src: int, dst: int) -> None:
        """Pass a stage's error on unchanged."""
        raw = self._recv_big(head.big_bytes, src, None)
        self._send(buf, dst, raw, None)


def payload_bytes(ring: Ring, data: torch.Tensor, mask: torch.Tensor | None) -> int:
    """Bytes of the big payload :meth:`Ring.send_data` will add (0 when the data fits inline)."""
    total = _align8(data.numel() * data.element_size()) + (mask.numel() * 8 if mask is not None else 0)
    return 0 if total <= ring.inline_bytes else total
