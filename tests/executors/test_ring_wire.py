"""The ring's packed steps on the wire: the chunk table, the header's checks, and the transport's layout."""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from noodle.errors import SpecError
from noodle.executors.codec import TensorHeader
from noodle.executors.ring.transport import Ring
from noodle.executors.ring.wire import (
    CHUNK_WORDS,
    MAX_BIG_BYTES,
    MAX_CHUNKS,
    Flag,
    LoadSlot,
    Op,
    RingHeader,
    StepSlot,
    WireChunk,
    chunk_words,
    header_len,
    read_chunks,
)

SLOTS = (StepSlot(),) * 3
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@st.composite
def packed_steps(draw: st.DrawFn) -> tuple[RingHeader, tuple[WireChunk, ...]]:
    """A valid packed step's header and chunks: to a stage (token ids or hidden states) or the logits reply."""
    ids = draw(st.lists(st.integers(1, 2**62 - 1), min_size=1, max_size=40, unique=True))
    chunks = tuple(WireChunk(i, draw(st.integers(1, 300)), draw(st.booleans()), draw(st.booleans())) for i in ids)
    n = sum(c.tokens for c in chunks)
    kind = draw(st.sampled_from(["ids", "hidden", "logits"]))
    if kind == "ids":
        data, flags = TensorHeader("int64", (1, n)), Flag.NONE
    elif kind == "hidden":
        data, flags = TensorHeader("float32", (1, n, draw(st.integers(1, 4096)))), Flag.NONE
    else:
        data, flags = TensorHeader("float32", (sum(c.logits for c in chunks), 1, draw(st.integers(1, 10**6)))), Flag.LOGITS
    if draw(st.booleans()):
        flags |= Flag.EXACT
    head = RingHeader(Op.STEP, flags=flags, data=data, chunks=len(chunks), big_bytes=draw(st.integers(0, MAX_BIG_BYTES)),
                      slots=SLOTS)  # fmt: skip
    return head, chunks


@settings(max_examples=200, deadline=None)
@given(packed_steps())
def test_a_packed_step_round_trips_through_its_header_and_chunk_table(step):
    head, chunks = step
    words = torch.zeros(header_len(4), dtype=torch.int64)
    head.write(words)
    assert RingHeader.read(words) == head
    table = chunk_words(chunks)
    assert table.dtype == torch.int64 and table.numel() == CHUNK_WORDS * len(chunks)
    assert read_chunks(table, head, field="msg") == chunks


@settings(max_examples=500, deadline=None)
@given(st.lists(INT64, min_size=header_len(4), max_size=header_len(4)))
def test_any_header_words_decode_or_are_refused_with_a_spec_error(words):
    try:
        head = RingHeader.read(torch.tensor(words, dtype=torch.int64))
    except SpecError as exc:
        assert str(exc).startswith("ring header")
        return
    assert 0 <= head.chunks <= MAX_CHUNKS and 0 <= head.big_bytes <= MAX_BIG_BYTES
    if head.chunks:
        assert head.op == Op.STEP and head.data is not None and head.mask is None


@settings(max_examples=300, deadline=None)
@given(packed_steps(), st.data())
def test_any_chunk_table_is_read_whole_and_consistent_or_refused(step, data):
    head, chunks = step
    words = chunk_words(chunks).tolist()
    for _ in range(data.draw(st.integers(1, 4))):  # corrupt a few words
        words[data.draw(st.integers(0, len(words) - 1))] = data.draw(st.one_of(INT64, st.integers(-3, 3)))
    try:
        got = read_chunks(torch.tensor(words, dtype=torch.int64), head, field="msg")
    except SpecError as exc:
        assert str(exc).startswith("msg.chunks")
        return
    assert len(got) == head.chunks and len({c.seq for c in got}) == len(got)
    assert all(1 <= c.seq < 2**62 and c.tokens >= 1 for c in got)
    assert head.data is not None
    if head.flags & Flag.LOGITS:
        assert sum(c.logits for c in got) == head.data.shape[0]
    else:
        assert sum(c.tokens for c in got) == head.data.shape[1]


IDS = TensorHeader("int64", (1, 5))
GOOD = RingHeader(Op.STEP, data=IDS, chunks=2, slots=SLOTS)


@pytest.mark.parametrize(
    ("head", "match"),
    [
        (replace(GOOD, chunks=MAX_CHUNKS + 1), rf"ring header.chunks: {MAX_CHUNKS + 1}, expected 0 to {MAX_CHUNKS}"),
        (replace(GOOD, chunks=-1), r"ring header.chunks: -1, expected 0 to"),
        (replace(GOOD, op=Op.END), r"ring header.chunks: END carries 2 chunks; only STEP messages carry chunks"),
        (replace(GOOD, flags=Flag.TOP1), r"ring header.flags: .*TOP1.* on a packed step"),
        (replace(GOOD, flags=Flag.PREFILL), r"ring header.flags: .*PREFILL.* on a packed step"),
        (replace(GOOD, mask=(1, 5)), r"ring header: a packed step of 2 chunks needs a tensor and no padding mask"),
        (replace(GOOD, data=None), r"ring header: a packed step of 2 chunks needs a tensor"),
        (replace(GOOD, data=TensorHeader("int64", (2, 5))), r"ring header.shape: a packed step of 2 chunks carries \(1, tokens >= 2\)"),
        (replace(GOOD, data=TensorHeader("int64", (1, 1))), r"carries \(1, tokens >= 2\) token ids .* got \[1, 1\]"),
        (replace(GOOD, flags=Flag.LOGITS, data=TensorHeader("float32", (3, 1, 9))), r"logits of a packed step of 2 chunks are \(rows <= 2, 1, vocab\), got \[3, 1, 9\]"),
        (replace(GOOD, chunks=0, flags=Flag.EXACT), r"ring header.flags: EXACT on a step without chunks"),
        (replace(GOOD, big_bytes=MAX_BIG_BYTES + 1), rf"ring header.big_bytes: {MAX_BIG_BYTES + 1}, expected 0 to {MAX_BIG_BYTES}"),
        (replace(GOOD, big_bytes=-8), r"ring header.big_bytes: -8"),
    ],
)  # fmt: skip
def test_a_malformed_packed_header_is_refused_naming_the_field(head, match):
    words = torch.zeros(header_len(4), dtype=torch.int64)
    head.write(words)
    with pytest.raises(SpecError, match=match):
        RingHeader.read(words)


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "int4"])
def test_a_load_carries_each_stage_format(fmt):
    from noodle.formats import FORMATS

    head = RingHeader(Op.LOAD, units_hash=7, slots=(LoadSlot(0, 3, -1, format=FORMATS.index(fmt)), LoadSlot(3, 6, 0)))
    words = torch.zeros(header_len(3), dtype=torch.int64)
    head.write(words)
    back = RingHeader.read(words)
    assert [s.format_name for s in back.slots] == [fmt, "float32"] and back.slots[1].device == 0


@pytest.mark.parametrize("code", [-1, 4, 1 << 40])
def test_a_load_with_an_unknown_format_code_is_refused(code):
    words = torch.zeros(header_len(3), dtype=torch.int64)
    RingHeader(Op.LOAD, units_hash=7, slots=(LoadSlot(0, 3), LoadSlot(3, 6))).write(words)
    words[16 + 4] = code  # stage 0's format word
    with pytest.raises(SpecError, match=rf"ring header.slots.format: {code}, expected 0 to 3"):
        RingHeader.read(words)


def test_unknown_flag_bits_are_refused():
    words = torch.zeros(header_len(4), dtype=torch.int64)
    GOOD.write(words)
    words[2] = 1 << 20
    with pytest.raises(SpecError, match=r"ring header.flags: unknown bits 0x100000"):
        RingHeader.read(words)


@pytest.mark.parametrize(
    ("words", "head", "match"),
    [
        ([0, 3, 1, 8, 2, 0], GOOD, r"m.chunks\[0\].seq: 0, expected 1 to"),
        ([2**62, 3, 1, 8, 2, 0], GOOD, r"m.chunks\[0\].seq: 4611686018427387904, expected 1 to 4611686018427387903"),
        ([7, 3, 1, 7, 2, 0], GOOD, r"m.chunks\[1\].seq: sequence 7 appears twice in one step"),
        ([7, 0, 1, 8, 5, 0], GOOD, r"m.chunks\[0\].tokens: 0, expected >= 1"),
        ([7, 3, 4, 8, 2, 0], GOOD, r"m.chunks\[0\].flags: 0x4, expected bits of 0x3 \(start, logits\)"),
        ([7, 3, 1, 8, 3, 0], GOOD, r"m.chunks: the chunks add up to 6 tokens, the packed tensor \[1, 5\] has 5"),
        ([7, 3, 1], GOOD, r"m.chunks: a table of 3 torch.int64 words for 2 chunks; expected 6 int64"),
        ([7, 3, 3, 8, 2, 2], replace(GOOD, flags=Flag.LOGITS, data=TensorHeader("float32", (1, 1, 9))),
         r"m.chunks: 2 chunks ask for logits, the reply carries 1 rows"),
    ],
)  # fmt: skip
def test_a_malformed_chunk_table_is_refused_naming_the_chunk(words, head, match):
    with pytest.raises(SpecError, match=match):
        read_chunks(torch.tensor(words, dtype=torch.int64), head, field="m")


class _Work:
    def wait(self, timeout=None) -> bool:
        return True


class _Group:
    """A process group of two ranks in one process: what one sends, the other receives, in order."""

    def __init__(self) -> None:
        self.queue: deque[torch.Tensor] = deque()

    def send(self, tensors, dst, tag):
        self.queue.append(tensors[0].clone())
        return _Work()

    def recv(self, tensors, src, tag):
        got = self.queue.popleft()
        assert got.numel() == tensors[0].numel(), "a receive of the wrong size: the ring is out of step"
        tensors[0].copy_(got)
        return _Work()


def _pair(inline: int) -> tuple[Ring, Ring]:
    small, big = _Group(), _Group()
    return (Ring(small, big, 0, 3, torch.device("cpu"), inline), Ring(small, big, 1, 3, torch.device("cpu"), inline))


@pytest.mark.parametrize("inline", [4096, 64])
def test_a_packed_step_crosses_the_transport_as_one_message_inline_or_with_its_payload(inline):
    a, b = _pair(inline)
    chunks = (WireChunk(1_000_001, 3, start=True, logits=True), WireChunk(1_000_002, 1, logits=True))
    hidden = torch.randn(1, 4, 8)
    a.send_data(a.header(Op.STEP, flags=Flag.EXACT), hidden, None, 1, chunks)
    assert len(a.small.queue) == 1 and len(a.big.queue) == (0 if inline == 4096 else 1)
    head, buf = b.recv(0)
    assert head.chunks == 2 and head.flags == Flag.EXACT and head.big_bytes == (0 if inline == 4096 else 2 * 24 + 128)
    data, mask, got = b.recv_data(head, buf, 0)
    assert torch.equal(data, hidden) and mask is None and got == chunks
    b.send_data(b.header(Op.STEP, session=3), torch.tensor([[4, 5]]), torch.tensor([[1, 1]]), 2)  # unpacked, a mask
    head2, buf2 = a.recv(1)
    assert head2.chunks == 0 and head2.mask == (1, 2)
    data2, mask2, got2 = a.recv_data(head2, buf2, 1)
    assert data2.tolist() == [[4, 5]] and mask2 is not None and mask2.tolist() == [[1, 1]] and got2 == ()


def test_a_refused_message_is_taken_off_the_ring_so_the_next_one_reads_right():
    a, b = _pair(64)
    ids = torch.arange(20).unsqueeze(0)  # 160 bytes + its table: the payload goes on the big group
    a.send_data(a.header(Op.STEP, flags=Flag.TOP1), ids, None, 1, (WireChunk(5, 20, start=True),))
    a.send_data(a.header(Op.STEP), ids, None, 1, (WireChunk(5, 21, start=True),))
    a.send_data(a.header(Op.STEP), ids, None, 1, (WireChunk(5, 20, start=True),))
    with pytest.raises(SpecError, match="ring header.flags"):
        b.recv(0)  # refused by its header
    head, buf = b.recv(0)
    with pytest.raises(SpecError, match="the chunks add up to 21 tokens"):
        b.recv_data(head, buf, 0)  # refused by its table
    head, buf = b.recv(0)
    data, _, chunks = b.recv_data(head, buf, 0)
    assert torch.equal(data, ids) and chunks == (WireChunk(5, 20, start=True),)
    assert not a.small.queue and not a.big.queue
