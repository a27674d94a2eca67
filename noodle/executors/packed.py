"""Continuous batching inside a stage: many sequences of different lengths in one forward.

A packed step carries the new tokens of several sequences back to back, ``(1, N)`` token ids or
``(1, N, hidden)`` hidden states, with one :class:`~noodle.executors.messages.SeqChunk` per
sequence saying how many of the ``N`` are its own. Each sequence keeps its own KV cache on the
stage, in buffers that grow by blocks of :data:`BLOCK` tokens (never a copy per step). The
stage runs its blocks once on the whole pack:

- a per-step cache object hands every attention layer the keys and values of all the step's
  sequences back to back (each sequence's past + its new tokens);
- the 4-D mask lets a token see only its own sequence, causally, within its attention kind's
  window (full, sliding, chunked), the same predicates transformers' masks use;
- positions and rotary embeddings are each token's own position in its sequence.

So decode tokens of many sequences and prefill chunks share one set of matmuls: what batching
buys. The result equals each sequence run alone up to floating-point reassociation (a matmul
over more rows may sum in another order); exact mode (one sequence per forward) is the
reference, and architectures whose attention cannot be packed (ALiBi, attention kernels other
than sdpa/eager) always run that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from noodle.errors import ExecutorError

if TYPE_CHECKING:
    from noodle.executors.messages import SeqChunk

__all__ = ["BLOCK", "SeqKV", "PackedStep", "PACKABLE_ATTENTION"]

BLOCK = 64  # KV buffers grow by whole blocks of this many tokens (and double when large)
PACKABLE_ATTENTION = frozenset({"sdpa", "eager"})


class SeqKV:
    """One sequence's KV cache on one stage: a key and a value buffer per local layer."""

    __slots__ = ("keys", "values", "length")

    def __init__(self, layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.length = 0  # tokens whose KV is stored (the same on every layer after a step)

    def nbytes(self) -> int:
        """Bytes the sequence's cache holds (its used part)."""
        total = 0
        for t in (*self.keys, *self.values):
            if t is not None:
                total += t[..., : self.length, :].numel() * t.element_size()
        return total

    @staticmethod
    def _room(buf: torch.Tensor | None, like: torch.Tensor, need: int, keep: int) -> torch.Tensor:
        if buf is not None and buf.shape[-2] >= need:
            return buf
        cap = max(BLOCK, -(-need // BLOCK) * BLOCK, 2 * buf.shape[-2] if buf is not None else 0)
        grown = like.new_empty((*like.shape[:-2], cap, like.shape[-1]))
        if buf is not None and keep:
            grown[..., :keep, :] = buf[..., :keep, :]
        return grown

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, past: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` (``(1, heads, n, dim)``) after ``past`` tokens; the whole ``past + n`` back."""
        end = past + k.shape[-2]
        kb = self._room(self.keys[layer], k, end, past)
        vb = self._room(self.values[layer], v, end, past)
        kb[..., past:end, :] = k
        vb[..., past:end, :] = v
        self.keys[layer], self.values[layer] = kb, vb
        return kb[..., :end, :], vb[..., :end, :]


class _StepCache(DynamicCache):
    """What the attention layers see as ``past_key_values`` during one packed step."""

    def __init__(self, step: PackedStep) -> None:
        super().__init__()
        self._step = step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        return self._step.update(layer_idx, key_states, value_states)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self._step.max_past


@dataclass
class _Entry:
    kv: SeqKV
    offset: int  # first of its tokens in the pack
    tokens: int
    past: int


class PackedStep:
    """The bookkeeping of one packed step on one stage: entries, positions, masks, the cache view."""

    def __init__(self, entries: list[_Entry], layer_index: dict[int, int], device: torch.device) -> None:
        self.entries = entries
        self._local = layer_index
        self.device = device
        self.total = sum(e.tokens for e in entries)
        self.max_past = max((e.past for e in entries), default=0)
        self.cache = _StepCache(self)

    @classmethod
    def begin(cls, seqs: tuple[SeqChunk, ...], store: dict[str, SeqKV], layer_index: dict[int, int],
              device: torch.device, where: str) -> PackedStep:  # fmt: skip
        """Entries for ``seqs``: a ``start`` chunk gets a fresh cache, the others continue theirs."""
        entries: list[_Entry] = []
        offset = 0
        seen: set[str] = set()
        for c in seqs:
            if c.seq in seen:
                raise ExecutorError(f"{where}: sequence {c.seq!r} appears twice in one step")
            seen.add(c.seq)
            if c.start:
                store[c.seq] = SeqKV(len(layer_index))
            kv = store.get(c.seq)
            if kv is None:
                raise ExecutorError(f"{where}: unknown sequence {c.seq!r}; its first chunk must say start")
            entries.append(_Entry(kv, offset, c.tokens, kv.length))
            offset += c.tokens
        return cls(entries, layer_index, device)

    def positions(self) -> torch.Tensor:
        """``(1, N)``: each new token's position in its own sequence."""
        parts = [torch.arange(e.past, e.past + e.tokens, device=self.device) for e in self.entries]
        return torch.cat(parts).unsqueeze(0)

    def mask(self, kind: str, config: Any, dtype: torch.dtype, eager: bool) -> torch.Tensor:
        """``(1, 1, N, K)``: a token sees its own sequence's keys up to itself (and within its window)."""
        dev = self.device
        seg_q = torch.repeat_interleave(torch.arange(len(self.entries), device=dev),
                                        torch.tensor([e.tokens for e in self.entries], device=dev))  # fmt: skip
        seg_k = torch.repeat_interleave(torch.arange(len(self.entries), device=dev),
                                        torch.tensor([e.past + e.tokens for e in self.entries], device=dev))  # fmt: skip
        pos_q = self.positions()[0]
        pos_k = torch.cat([torch.arange(e.past + e.tokens, device=dev) for e in self.entries])
        q, k = pos_q[:, None], pos_k[None, :]
        allowed = (seg_q[:, None] == seg_k[None, :]) & (k <= q)
        if kind == "sliding_attention":
            window = getattr(config, "sliding_window", None)
            if window:
                allowed &= k > q - int(window)
        elif kind == "chunked_attention":
            size = getattr(config, "attention_chunk_size", None)
            if size:
                allowed &= (k // int(size)) == (q // int(size))
        allowed = allowed[None, None]
        if not eager:
            return allowed
        out = torch.zeros(allowed.shape, dtype=dtype, device=dev)
        return out.masked_fill(~allowed, torch.finfo(dtype).min)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = self._local.get(layer_idx)
        if local is None:
            raise ExecutorError(f"packed step: layer {layer_idx} is not on this stage")
        if k.shape[0] != 1 or k.shape[-2] != self.total:
            raise ExecutorError(f"packed step: layer {layer_idx} gave keys of shape {tuple(k.shape)} for {self.total} tokens")
        ks, vs = [], []
        for e in self.entries:
            kk, vv = e.kv.write(local, k[..., e.offset : e.offset + e.tokens, :], v[..., e.offset : e.offset + e.tokens, :],
                                e.past)  # fmt: skip
            ks.append(kk)
            vs.append(vv)
        if len(ks) == 1:
            return ks[0], vs[0]
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    def finish(self) -> None:
        """Every entry's cache now holds its new tokens."""
        for e in self.entries:
            e.kv.length = e.past + e.tokens

    def last_rows(self, seqs: tuple[SeqChunk, ...]) -> list[int]:
        """Indices in the pack of the last token of every chunk that asks for logits."""
        return [e.offset + e.tokens - 1 for e, c in zip(self.entries, seqs) if c.logits]
