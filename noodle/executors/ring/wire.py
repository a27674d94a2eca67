"""The ring's message header: :class:`RingHeader`, typed, and its one int64 encoding.

Every message around the ring starts with a fixed-size int64 header (:func:`header_len`
words): the operation, the session, flags, the :class:`~noodle.executors.codec.TensorHeader`
of the tensor that follows and the shape of its padding mask, and one slot per stage that
the stage fills on the way (:class:`StepSlot`: its timestamps, KV-cache bytes, bytes sent
on; :class:`LoadSlot` for ``LOAD``). :meth:`RingHeader.write` and :meth:`RingHeader.read`
are the only code that knows where each field sits; :meth:`RingHeader.read` checks what it
decodes (operation, dtype code, dimensions) through the codec.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field, replace
from enum import IntEnum, IntFlag

import torch

from noodle.errors import SpecError
from noodle.executors.codec import MAX_DIMS, TensorHeader
from noodle.executors.messages import StageInput

__all__ = ["Op", "Flag", "StepSlot", "LoadSlot", "RingHeader", "header_len", "units_hash", "step_flags", "align8"]


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


def align8(n: int) -> int:
    """``n`` rounded up to a multiple of 8 (payload parts start on int64 boundaries)."""
    return (n + 7) // 8 * 8
