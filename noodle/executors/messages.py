"""What one stage hands to the next: plain tensors plus a little metadata.

A :class:`StageInput` goes into :meth:`Stage.step`; a :class:`StageOutput` comes
out. Both are frozen and hold only ``torch.Tensor`` s, strings, ints and bools,
so any transport can carry them: :func:`encode` / :func:`decode` turn one into
safetensors bytes and back (what the gRPC executor sends), in-process executors
pass the objects as they are.

Everything else a stage needs (position ids, the 4-D attention mask, rotary
embeddings) is recomputed inside the stage from the session's 2-D padding mask,
which grows by the ``attention_mask`` columns each step brings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from noodle.errors import SpecError

__all__ = ["StageInput", "StageOutput", "encode", "decode", "payload_bytes"]


@dataclass(frozen=True)
class StageInput:
    """One step of one session for one stage.

    Attributes:
        session: id of the generation this step belongs to (one KV cache per id).
        data: token ids ``(batch, new_tokens)`` int64 for the first stage, hidden
            states ``(batch, new_tokens, hidden)`` for the others.
        attention_mask: ``(batch, new_tokens)`` 0/1 padding mask of the new tokens;
            ``None`` means all ones (no padding).
        prefill: ``True`` starts the session (a fresh KV cache), ``False`` continues it.
        all_logits: the last stage returns logits of every new position, not only the last.
    """

    session: str
    data: torch.Tensor
    attention_mask: torch.Tensor | None = None
    prefill: bool = False
    all_logits: bool = False

    @property
    def batch_size(self) -> int:
        return int(self.data.shape[0])

    @property
    def new_tokens(self) -> int:
        return int(self.data.shape[1])

    def nbytes(self) -> int:
        """Bytes of tensor payload this message carries."""
        return payload_bytes(self.data, self.attention_mask)


@dataclass(frozen=True)
class StageOutput:
    """What a stage produced: hidden states for the next stage, or logits from the last.

    Attributes:
        session: the session id of the input.
        data: hidden states ``(batch, new_tokens, hidden)`` or logits
            ``(batch, positions, vocab)`` (``positions`` is 1 unless ``all_logits``).
        attention_mask: the input's padding mask, passed on unchanged.
        is_logits: ``True`` when ``data`` holds logits (the stage holds ``lm_head``).
    """

    session: str
    data: torch.Tensor
    attention_mask: torch.Tensor | None = None
    is_logits: bool = False

    def nbytes(self) -> int:
        return payload_bytes(self.data, self.attention_mask)

    def next_input(self, *, prefill: bool, all_logits: bool = False) -> StageInput:
        """The input of the following stage."""
        return StageInput(self.session, self.data, self.attention_mask, prefill, all_logits)


def payload_bytes(*tensors: torch.Tensor | None) -> int:
    """Total bytes of the given tensors (``None`` counts as zero)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def encode(msg: StageInput | StageOutput) -> bytes:
    """Serialise a message to safetensors bytes (tensors + JSON metadata)."""
    from safetensors.torch import save

    tensors = {"data": msg.data.contiguous()}
    if msg.attention_mask is not None:
        tensors["attention_mask"] = msg.attention_mask.contiguous()
    if isinstance(msg, StageInput):
        meta = {"kind": "input", "session": msg.session, "prefill": msg.prefill, "all_logits": msg.all_logits}
    else:
        meta = {"kind": "output", "session": msg.session, "is_logits": msg.is_logits}
    return save(tensors, metadata={"noodle": json.dumps(meta)})


def decode(blob: bytes) -> StageInput | StageOutput:
    """Inverse of :func:`encode`; malformed bytes raise :class:`SpecError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(blob)
        meta = json.loads(_metadata(blob)["noodle"])
        mask = tensors.get("attention_mask")
        if meta["kind"] == "input":
            return StageInput(meta["session"], tensors["data"], mask, bool(meta["prefill"]), bool(meta["all_logits"]))
        if meta["kind"] == "output":
            return StageOutput(meta["session"], tensors["data"], mask, bool(meta["is_logits"]))
    except (SafetensorError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise SpecError(f"stage message: malformed payload ({exc})") from None
    raise SpecError(f"stage message: unknown kind {meta.get('kind')!r}, expected 'input' or 'output'")


def _metadata(blob: bytes) -> dict[str, str]:
    # safetensors layout: 8-byte little-endian header length, then a JSON header.
    if len(blob) < 8:
        raise ValueError("payload shorter than its header")
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    return dict(header.get("__metadata__", {}))
