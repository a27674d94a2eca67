"""The tensor codec and the ring's typed header: round trips, and every check on what arrives."""

from __future__ import annotations

import pytest
import torch

from noodle.errors import SpecError
from noodle.executors import codec
from noodle.executors.codec import TensorHeader
from noodle.executors.ring.wire import Flag, LoadSlot, Op, RingHeader, StepSlot, header_len


@pytest.mark.parametrize(("name", "dtype"), list(codec.DTYPES.items()))
def test_every_allowed_dtype_round_trips(name, dtype):
    t = (torch.randn(2, 3, 5) * 100).to(dtype)
    head, raw = codec.encode(t)
    assert head == TensorHeader(name, (2, 3, 5)) and len(raw) == t.numel() * t.element_size()
    back = codec.decode(head, raw, field="x")
    assert back.dtype == dtype and torch.equal(back, t)
    assert TensorHeader.from_code(head.code, head.shape, field="x") == head


def test_non_contiguous_and_empty_tensors():
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()
    assert torch.equal(codec.decode(*codec.encode(t), field="x"), t)
    empty = torch.zeros(0, 4)
    head, raw = codec.encode(empty)
    assert raw == b"" and codec.decode(head, raw, field="x").shape == (0, 4)


def test_a_dtype_outside_the_allow_list_cannot_leave():
    with pytest.raises(SpecError, match="dtype torch.uint8 cannot travel"):
        codec.encode(torch.zeros(3, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("head", "nbytes", "match"),
    [
        (TensorHeader("pickle", (1,)), 8, r"req.dtype: 'pickle' is not supported; use one of float32"),
        (TensorHeader("float32", ()), 4, r"req.shape: 0 dimensions \[\], expected 1 to 4"),
        (TensorHeader("float32", (1, 1, 1, 1, 1)), 4, r"req.shape: 5 dimensions"),
        (TensorHeader("float32", (2, -3)), 0, r"req.shape: negative dimension in \[2, -3\]"),
        (TensorHeader("float32", (1, 3)), 8, r"req.data: 8 bytes, but shape \[1, 3\] of float32 needs 12 bytes"),
        (TensorHeader("int64", (1024, 1024)), 0, r"req: shape \[1024, 1024\] of int64 is 8388608 bytes, over .* 1000 bytes"),
    ],
)
def test_what_arrives_is_checked(head, nbytes, match):
    with pytest.raises(SpecError, match=match):
        codec.decode(head, bytes(nbytes), field="req", max_bytes=1000)


def test_unknown_dtype_code_is_refused():
    with pytest.raises(SpecError, match=r"ring.dtype: code 9 is not supported; use 0 to 5"):
        TensorHeader.from_code(9, (1,), field="ring")


def test_ring_header_round_trips_through_its_int64_tensor():
    words = torch.zeros(header_len(4), dtype=torch.int64)
    step = RingHeader(Op.STEP, session=7, flags=Flag.PREFILL | Flag.TOP1, data=TensorHeader("float32", (2, 5, 768)),
                      mask=(2, 5), rank=2, units_hash=2**61 + 3, lost=True, big_bytes=30760,
                      slots=(StepSlot(1, 2, 3, 4), StepSlot(5, 6, 7, 8), StepSlot(time_ns := 2**62, time_ns + 1, 0, 9)))  # fmt: skip
    step.write(words)
    assert RingHeader.read(words) == step
    load = RingHeader(Op.LOAD, units_hash=42, slots=(LoadSlot(0, 3, -1, 0), LoadSlot(3, 5, 1, 0), LoadSlot(5, 7, 0, 99)))
    load.write(words)
    back = RingHeader.read(words)
    assert back == load and back.load_slot(2).param_bytes == 99
    assert back.with_slot(0, LoadSlot(0, 3, -1, 12)).load_slot(0).param_bytes == 12 and back.load_slot(0).param_bytes == 0
    bare = RingHeader(Op.PING, slots=(StepSlot(),) * 3)
    bare.write(words)
    assert RingHeader.read(words) == bare and RingHeader.read(words).data is None


def test_a_bad_ring_header_is_refused():
    words = torch.zeros(header_len(3), dtype=torch.int64)
    with pytest.raises(SpecError, match=r"ring header.op: 0 is not an operation"):
        RingHeader.read(words)
    RingHeader(Op.STEP, data=TensorHeader("float32", (1, 2)), slots=(StepSlot(),) * 2).write(words)
    words[3] = 17  # the dtype code
    with pytest.raises(SpecError, match="code 17 is not supported"):
        RingHeader.read(words)
