"""The ring's message header: :class:`RingHeader`, typed, and its one int64 encoding.

Every message around the ring starts with a fixed-size int64 header (:func:`header_len`
words): the operation, the session, flags, the :class:`~noodle.executors.codec.TensorHeader`
of the tensor that follows and the shape of its padding mask, and one slot per stage that
the stage fills on the way (:class:`StepSlot`: its timestamps, KV-cache bytes, bytes sent
on; :class:`LoadSlot` for ``LOAD``). :meth:`RingHeader.write` and :meth:`RingHeader.read`
are the only code that knows where each field sits; :meth:`RingHeader.read` checks what it
decodes (operation, flags, dtype code, dimensions, payload size) through the codec.

A packed step (continuous batching) carries its chunks in the same message: the header
says how many (``chunks``, at most :data:`MAX_CHUNKS`) and whether the step is ``EXACT``;
the payload starts with the chunk table, :data:`CHUNK_WORDS` int64 words per chunk
(:class:`WireChunk`: the sequence's wire id, its token count, its start/logits bits), then
the packed tensor. :func:`chunk_words` writes the table and :func:`read_chunks` reads it
back, checking every chunk against the tensor it describes. Sequence ids are strings in
the engine (``req-17``); the coordinator maps them to positive integers
(:class:`~noodle.executors.ring.lanes.RingDriver`) and workers name them ``s<id>``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field, fields, replace
from enum import IntEnum, IntFlag

import torch

from noodle.errors import SpecError
from noodle.formats import FORMATS
from noodle.executors.codec import DEFAULT_MAX_TENSOR_BYTES, MAX_DIMS, TensorHeader
from noodle.executors.messages import StageInput

__all__ = ["Op", "Flag", "StepSlot", "LoadSlot", "RingHeader", "WireChunk", "header_len", "units_hash", "step_flags",
           "align8", "chunk_words", "read_chunks", "announced_big_bytes", "MAX_CHUNKS", "CHUNK_WORDS", "MAX_BIG_BYTES"]  # fmt: skip


class Op(IntEnum):
    """What a message asks of every rank it passes."""

    STEP = 1
    LOAD = 2
    END = 3
    SHUTDOWN = 4
    ERROR = 5
    PING = 6


class Flag(IntFlag):
    """How a ``STEP`` runs (``PREFILL``, ``ALL_LOGITS``, ``TOP1``; a packed step: ``EXACT``) and what it carries
    back (``LOGITS``)."""

    NONE = 0
    PREFILL = 1
    ALL_LOGITS = 2
    TOP1 = 4
    EXACT = 8
    LOGITS = 16


MAX_CHUNKS = 4096  # chunks one packed step may carry: serve's --concurrency cap, one chunk per sequence
CHUNK_WORDS = 3  # int64 words per chunk in the table: wire id, tokens, start/logits bits
_START, _WANTS_LOGITS = 1, 2  # the bits of a chunk's third word
MAX_SEQ_ID = 2**62  # wire ids are 1 .. MAX_SEQ_ID - 1
# Largest payload a header may announce: a tensor at the codec's limit, its mask (as big again, at most) and a
# chunk table, or an error's text (under 64 KiB).
MAX_BIG_BYTES = 2 * DEFAULT_MAX_TENSOR_BYTES + MAX_CHUNKS * CHUNK_WORDS * 8
_UNPACKED_ONLY = Flag.PREFILL | Flag.ALL_LOGITS | Flag.TOP1  # a packed step's chunks say what these say


@dataclass(frozen=True)
class StepSlot:
    """What stage ``k`` writes into a ``STEP`` (or ``PING``) on the way: times on its monotonic clock (ns), sizes.

    ``kv_bytes`` is the KV cache of the step's session or sequences (``STEP``), or all the stage holds (``PING``).
    """

    t_in: int = 0
    t_out: int = 0
    kv_bytes: int = 0
    sent_bytes: int = 0


@dataclass(frozen=True)
class LoadSlot:
    """Stage ``k`` of a ``LOAD``: units ``[start, end)``, CUDA index (-1: the worker's device), parameter bytes back,
    and the weight format (its index in :data:`noodle.formats.FORMATS`; 0 is float32)."""

    start: int = 0
    end: int = 0
    device: int = -1
    param_bytes: int = 0
    format: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.format < len(FORMATS):
            raise SpecError(f"ring header.slots.format: {self.format}, expected 0 to {len(FORMATS) - 1} ({', '.join(FORMATS)})")

    @property
    def format_name(self) -> str:
        return FORMATS[self.format]


# Positions in the int64 header, used by RingHeader.write/read only; then _SLOT per stage from _BASE.
_OP, _SESSION, _FLAGS, _DTYPE, _NDIM, _SHAPE, _MASK, _RANK, _UNITS, _LOST, _BIG, _CHUNKS, _BASE = (
    0, 1, 2, 3, 4, 5, 9, 11, 12, 13, 14, 15, 16)  # fmt: skip
_SLOT = 5  # words per stage slot (a StepSlot leaves its last word 0)
_HAS_MASK = 1 << 40  # in the flags word, beside Flag
_ALL_FLAGS = int(Flag.PREFILL | Flag.ALL_LOGITS | Flag.TOP1 | Flag.EXACT | Flag.LOGITS)


def header_len(world_size: int) -> int:
    """int64 words in the header of a ring of ``world_size`` ranks."""
    return _BASE + _SLOT * max(world_size - 1, 1)


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
        chunks: a packed step's chunk count (0: not packed); the chunk table opens the payload.
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
    chunks: int = 0
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
        words[_CHUNKS] = self.chunks
        for k, slot in enumerate(self.slots):
            values = astuple(slot)
            words[_BASE + _SLOT * k : _BASE + _SLOT * k + len(values)] = values
        out.copy_(torch.tensor(words, dtype=torch.int64))

    @classmethod
    def read(cls, words_t: torch.Tensor) -> RingHeader:
        """Decode an int64 header tensor, checking every field (dtype and shape through the codec).

        Raises:
            SpecError: naming the field and the numbers.
        """
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
        raw_flags = words[_FLAGS]
        unknown = raw_flags & ~(_HAS_MASK | _ALL_FLAGS)
        if unknown:
            raise SpecError(f"ring header.flags: unknown bits {unknown:#x} in {raw_flags:#x}; known: {_ALL_FLAGS:#x} "
                            f"and the mask bit {_HAS_MASK:#x}")  # fmt: skip
        if not 0 <= words[_BIG] <= MAX_BIG_BYTES:
            raise SpecError(f"ring header.big_bytes: {words[_BIG]}, expected 0 to {MAX_BIG_BYTES}")
        slot_type = LoadSlot if op == Op.LOAD else StepSlot
        n, width = (len(words) - _BASE) // _SLOT, len(fields(slot_type))
        head = cls(
            op=op, session=words[_SESSION], flags=Flag(raw_flags & ~_HAS_MASK), data=data,
            mask=(words[_MASK], words[_MASK + 1]) if raw_flags & _HAS_MASK else None, rank=words[_RANK],
            units_hash=words[_UNITS], lost=bool(words[_LOST]), big_bytes=words[_BIG], chunks=words[_CHUNKS],
            slots=tuple(slot_type(*words[_BASE + _SLOT * k : _BASE + _SLOT * k + width]) for k in range(n)),
        )  # fmt: skip
        head.check_packed()
        return head

    def check_packed(self) -> None:
        """A packed step's header fields agree: the chunk count, the op, the flags, the tensor's shape.

        The tensor going out to a stage is ``(1, N)`` or ``(1, N, hidden)`` with ``N`` >= the chunk
        count (each chunk has a token or more); the last stage's reply (``LOGITS``) is ``(M, 1, vocab)``,
        ``M`` <= the chunk count (one row per chunk that asks for logits).
        """
        where = "ring header"
        if not 0 <= self.chunks <= MAX_CHUNKS:
            raise SpecError(f"{where}.chunks: {self.chunks}, expected 0 to {MAX_CHUNKS} (chunks in one packed step)")
        if not self.chunks:
            if self.flags & Flag.EXACT:
                raise SpecError(f"{where}.flags: EXACT on a step without chunks; only a packed step may say it")
            return
        if self.op != Op.STEP:
            raise SpecError(f"{where}.chunks: {self.op.name} carries {self.chunks} chunks; only STEP messages carry chunks")
        if self.flags & _UNPACKED_ONLY:
            raise SpecError(f"{where}.flags: {self.flags!r} on a packed step; PREFILL, ALL_LOGITS and TOP1 are for "
                            "unpacked steps (a packed step's chunks say where sequences start and which want logits)")  # fmt: skip
        if self.data is None or self.mask is not None:
            raise SpecError(f"{where}: a packed step of {self.chunks} chunks needs a tensor and no padding mask, got "
                            f"tensor {self.data.shape if self.data else None}, mask {self.mask}")  # fmt: skip
        shape = self.data.shape
        if self.flags & Flag.LOGITS:
            if len(shape) != 3 or shape[1] != 1 or not 0 <= shape[0] <= self.chunks:
                raise SpecError(f"{where}.shape: the logits of a packed step of {self.chunks} chunks are (rows <= "
                                f"{self.chunks}, 1, vocab), got {list(shape)}")  # fmt: skip
        elif len(shape) not in (2, 3) or shape[0] != 1 or shape[1] < self.chunks:
            raise SpecError(f"{where}.shape: a packed step of {self.chunks} chunks carries (1, tokens >= {self.chunks}) "
                            f"token ids or (1, tokens, hidden) hidden states, got {list(shape)}")  # fmt: skip


@dataclass(frozen=True)
class WireChunk:
    """A :class:`~noodle.executors.messages.SeqChunk` on the wire: its sequence named by a positive integer."""

    seq: int
    tokens: int
    start: bool = False
    logits: bool = False


def chunk_words(chunks: Sequence[WireChunk]) -> torch.Tensor:
    """The chunk table of a packed step: :data:`CHUNK_WORDS` int64 words per chunk."""
    words = [w for c in chunks for w in (c.seq, c.tokens, (_START if c.start else 0) | (_WANTS_LOGITS if c.logits else 0))]
    return torch.tensor(words, dtype=torch.int64)


def read_chunks(table: torch.Tensor, head: RingHeader, *, field: str) -> tuple[WireChunk, ...]:
    """The chunks in ``table`` (``head.chunks * CHUNK_WORDS`` int64 words), checked against ``head``'s tensor.

    Every chunk names a sequence id in ``[1, 2**62)`` once, has a token or more and only the start and
    logits bits; the tokens add up to the packed tensor's ``N`` (a step to a stage), or the chunks
    asking for logits number the reply's rows (``LOGITS``).

    Raises:
        SpecError: naming ``field``, the chunk and the numbers.
    """
    head.check_packed()
    if table.dtype != torch.int64 or table.numel() != head.chunks * CHUNK_WORDS:
        raise SpecError(f"{field}.chunks: a table of {table.numel()} {table.dtype} words for {head.chunks} chunks; "
                        f"expected {head.chunks * CHUNK_WORDS} int64")  # fmt: skip
    words = table.tolist()
    out: list[WireChunk] = []
    seen: set[int] = set()
    for i in range(head.chunks):
        seq, tokens, bits = words[CHUNK_WORDS * i : CHUNK_WORDS * i + CHUNK_WORDS]
        if not 1 <= seq < MAX_SEQ_ID:
            raise SpecError(f"{field}.chunks[{i}].seq: {seq}, expected 1 to {MAX_SEQ_ID - 1}")
        if seq in seen:
            raise SpecError(f"{field}.chunks[{i}].seq: sequence {seq} appears twice in one step")
        seen.add(seq)
        if tokens < 1:
            raise SpecError(f"{field}.chunks[{i}].tokens: {tokens}, expected >= 1")
        if bits & ~(_START | _WANTS_LOGITS):
            raise SpecError(f"{field}.chunks[{i}].flags: {bits:#x}, expected bits of {_START | _WANTS_LOGITS:#x} "
                            "(start, logits)")  # fmt: skip
        out.append(WireChunk(seq, tokens, bool(bits & _START), bool(bits & _WANTS_LOGITS)))
    shape = head.data.shape if head.data is not None else ()
    if head.flags & Flag.LOGITS:
        rows = sum(c.logits for c in out)
        if rows != shape[0]:
            raise SpecError(f"{field}.chunks: {rows} chunks ask for logits, the reply carries {shape[0]} rows")
    elif sum(c.tokens for c in out) != shape[1]:
        raise SpecError(f"{field}.chunks: the chunks add up to {sum(c.tokens for c in out)} tokens, the packed "
                        f"tensor {list(shape)} has {shape[1]}")  # fmt: skip
    return tuple(out)


def announced_big_bytes(words_t: torch.Tensor) -> int:
    """The payload size a header announces, if it is within bounds (else 0): what to take off the ring
    after refusing the header, so the next message is read from its start."""
    big = int(words_t[_BIG])
    return big if 0 <= big <= MAX_BIG_BYTES else 0


def step_flags(msg: StageInput) -> Flag:
    """The flags of a ``STEP`` carrying ``msg``."""
    return (Flag.PREFILL if msg.prefill else Flag.NONE) | (Flag.ALL_LOGITS if msg.all_logits else Flag.NONE)


def units_hash(units: Sequence[str]) -> int:
    """A 62-bit fingerprint of a model's unit names (plans and workers must agree)."""
    return int.from_bytes(hashlib.sha256("\n".join(units).encode()).digest()[:8], "little") >> 2


def align8(n: int) -> int:
    """``n`` rounded up to a multiple of 8 (payload parts start on int64 boundaries)."""
    return (n + 7) // 8 * 8
