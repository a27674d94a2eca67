"""Tensors in gRPC messages: the codec's header and bytes in a protobuf ``Tensor``.

A :class:`~noodle.executors.grpc.stage_service_pb2.Tensor` is ``(dtype name, shape,
bytes)``, the fields of :class:`~noodle.executors.codec.TensorHeader` plus the raw
little-endian bytes; :func:`from_proto` hands them to :func:`~noodle.executors.codec.decode`,
which checks everything before it builds a tensor.
"""

from __future__ import annotations

import torch

from noodle.executors.codec import DEFAULT_MAX_TENSOR_BYTES, TensorHeader, decode, encode
from noodle.executors.grpc import stage_service_pb2 as pb

__all__ = ["to_proto", "from_proto", "wire_bytes"]


def to_proto(t: torch.Tensor) -> pb.Tensor:
    """A CPU copy of ``t`` as raw bytes with its dtype and shape."""
    head, raw = encode(t)
    return pb.Tensor(dtype=head.dtype, shape=list(head.shape), data=raw)


def from_proto(msg: pb.Tensor, *, field: str, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> torch.Tensor:
    """The tensor a :class:`pb.Tensor` describes, after checking it.

    Raises:
        SpecError: naming ``field`` and the numbers (unknown dtype, bad shape,
            byte count that does not match the shape, more than ``max_bytes``).
    """
    head = TensorHeader(msg.dtype, tuple(int(d) for d in msg.shape))
    return decode(head, msg.data, field=field, max_bytes=max_bytes)


def wire_bytes(msg: pb.ForwardRequest | pb.ForwardReply) -> int:
    """Serialized size of a message (what crosses the network, framing aside)."""
    return int(msg.ByteSize())
