"""Continuous batching inside a stage: many sequences of different lengths in one forward.

A packed step carries the new tokens of several sequences back to back, ``(1, N)`` token ids or
``(1, N, hidden)`` hidden states, with one :class:`~noodle.executors.messages.SeqChunk` per
sequence saying how many of the ``N`` are its own. Each sequence keeps its own KV cache on the
stage, in buffers that grow by whole blocks of :data:`BLOCK` tokens (a sequence holds at most
``BLOCK - 1`` tokens more than it uses; growing copies its cache once per block). The stage runs
its blocks once on the whole pack:

- a per-step cache object writes every layer's new keys and values into each sequence's own
  buffers;
- attention goes through one attention function of noodle's, registered with transformers'
  ``AttentionInterface`` for the step: it runs the model's own attention (``sdpa`` or the
  model's eager function, with its scaling, soft-capping, sinks) on the sequences of the step
  as they are: every decoding sequence together as one padded batch (one query against its own
  keys), each prompt chunk on its own; the masks keep a token causal within its own sequence and
  its attention kind's window (full, sliding, chunked), the same predicates transformers' masks
  use. So a step costs what its sequences' own attention costs, not all of them against all;
- positions and rotary embeddings are each token's own position in its sequence.

So decode tokens of many sequences and prefill chunks share one set of matmuls: what batching
buys. The result equals each sequence run alone up to floating-point reassociation (a matmul
over more rows may sum in another order); exact mode (one sequence per forward) is the
reference, and architectures whose attention cannot be packed (ALiBi, attention kernels other
than sdpa/eager) always run that way.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from noodle.errors import ExecutorError

if TYPE_CHECKING:
    from noodle.executors.messages import SeqChunk

__all__ = ["BLOCK", "SeqKV", "PackedStep", "PACKABLE_ATTENTION", "ATTENTION_NAME", "packed_attention"]

BLOCK = 64  # KV buffers grow by whole blocks of this many tokens
PACKABLE_ATTENTION = frozenset({"sdpa", "eager"})
ATTENTION_NAME = "noodle_packed"
_ACTIVE = threading.local()  # the packed step the running thread's stage is computing


def _packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    step = getattr(_ACTIVE, "step", None)
    if step is None:  # another thread's step on a stage whose configs a packed step switched: the model's own
        base = getattr(getattr(module, "config", None), "_noodle_base_attention", "sdpa")
        return _base_attention(module, base)(module, query, key, value, attention_mask, **kwargs)
    return step.attend(module, query, kwargs), None


def _base_attention(module: torch.nn.Module, attn: str) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The attention the model itself would run: transformers' ``sdpa``, or the module's own eager function."""
    if attn == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ExecutorError(f"packed step: {type(module).__name__} has no eager_attention_forward to run")
    return fn


AttentionInterface.register(ATTENTION_NAME, _packed_attention)


@contextmanager
def packed_attention(step: PackedStep, configs: list[Any]) -> Iterator[None]:
    """Route the attention of the modules reading ``configs`` to ``step`` while the block runs on this thread."""
    before = [c._attn_implementation for c in configs]
    _ACTIVE.step = step
    try:
        for c, b in zip(configs, before):
            c._noodle_base_attention = b
            c._attn_implementation = ATTENTION_NAME
        yield
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation = b
        _ACTIVE.step = None


class SeqKV:
    """One sequence's KV cache on one stage: a key and a value buffer per local layer."""

    __slots__ = ("keys", "values", "length")

    def __init__(self, layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.length = 0  # tokens whose KV is stored (the same on every layer after a step)

    def nbytes(self) -> int:
        """Bytes the sequence's cache buffers hold (allocated, whole blocks)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

    @staticmethod
    def _room(buf: torch.Tensor | None, like: torch.Tensor, need: int, keep: int) -> torch.Tensor:
        if buf is not None and buf.shape[-2] >= need:
            return buf
        cap = -(-need // BLOCK) * BLOCK
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
        self.ragged = True  # attention through _packed_attention; False: keys back to back under one mask
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
        return torch.cat([torch.arange(e.past, e.past + e.tokens) for e in self.entries]).unsqueeze(0).to(self.device)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each sequence's new keys/values into its buffers.

        Ragged, the new ones go back unchanged: :func:`_packed_attention` takes every sequence's past
        from its buffers. Otherwise every sequence's past + new keys go back to back, for attention
        under :meth:`mask` (models whose attention does not go through transformers' interface as
        :func:`_packed_attention` needs: ``KEYS_BACK_TO_BACK`` in :mod:`noodle.models.conformance`).
        """
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
        if self.ragged:
            return k, v
        return (ks[0], vs[0]) if len(ks) == 1 else (torch.cat(ks, dim=-2), torch.cat(vs, dim=-2))

    def mask(self, kind: str, config: Any, dtype: torch.dtype, eager: bool) -> torch.Tensor:
        """``(1, 1, N, K)`` over every sequence's keys back to back (for attention that is not ragged)."""
        self._config = config
        seg_q = torch.repeat_interleave(torch.arange(len(self.entries)), torch.tensor([e.tokens for e in self.entries]))
        seg_k = torch.repeat_interleave(torch.arange(len(self.entries)),
                                        torch.tensor([e.past + e.tokens for e in self.entries]))  # fmt: skip
        q = torch.cat([torch.arange(e.past, e.past + e.tokens) for e in self.entries])[:, None]
        k = torch.cat([torch.arange(e.past + e.tokens) for e in self.entries])[None, :]
        allowed = (seg_q[:, None] == seg_k[None, :]) & self._allowed(kind, q, k)
        self._eager, self._dtype = eager, dtype
        return self._as_mask(allowed[None, None])

    # -- attention -----------------------------------------------------------------------------------
    def prepare(self, config: Any, kinds: dict[int, str], attn: str, dtype: torch.dtype) -> None:
        """What :meth:`attend` needs for this step: layer kinds, the model's attention, the pieces' masks."""
        self._config, self._kinds, self._eager, self._dtype = config, kinds, attn == "eager", dtype
        self._attn = attn
        self._dec = [e for e in self.entries if e.tokens == 1]
        self._pre = [e for e in self.entries if e.tokens > 1]
        self._dec_idx = torch.tensor([e.offset for e in self._dec], dtype=torch.long).to(self.device)
        self._masks: dict[tuple[str, int], torch.Tensor] = {}

    def _allowed(self, kind: str, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        allowed = k <= q
        if kind == "sliding_attention":
            window = getattr(self._config, "sliding_window", None)
            if window:
                allowed &= k > q - int(window)
        elif kind == "chunked_attention":
            size = getattr(self._config, "attention_chunk_size", None)
            if size:
                allowed &= (k // int(size)) == (q // int(size))
        return allowed

    def _as_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        allowed = allowed.to(self.device)
        if not self._eager:
            return allowed
        return torch.zeros(allowed.shape, dtype=self._dtype, device=self.device).masked_fill(~allowed, torch.finfo(self._dtype).min)

    def _decode_mask(self, kind: str) -> torch.Tensor:
        """``(S, 1, 1, Lmax)`` for the decoding sequences, right-padded to the longest."""
        if (kind, -1) not in self._masks:
            lmax = max(e.past + 1 for e in self._dec)
            k = torch.arange(lmax)[None, :]
            q = torch.tensor([e.past for e in self._dec])[:, None]
            self._masks[(kind, -1)] = self._as_mask((self._allowed(kind, q, k) & (k <= q))[:, None, None, :])
        return self._masks[(kind, -1)]

    def _chunk_mask(self, kind: str, i: int) -> torch.Tensor:
        if (kind, i) not in self._masks:
            e = self._pre[i]
            q = torch.arange(e.past, e.past + e.tokens)[:, None]
            k = torch.arange(e.past + e.tokens)[None, :]
            self._masks[(kind, i)] = self._as_mask(self._allowed(kind, q, k)[None, None])
        return self._masks[(kind, i)]

    def attend(self, module: torch.nn.Module, query: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """The model's attention on each sequence of the step against its own keys: ``(1, N, heads, dim)``."""
        layer = int(getattr(module, "layer_idx", -1))
        local, kind = self._local.get(layer), self._kinds.get(layer)
        if local is None or kind is None:
            raise ExecutorError(f"packed step: attention of layer {layer} is not on this stage")
        base = _base_attention(module, self._attn)
        pieces: list[tuple[torch.Tensor, torch.Tensor]] = []  # (positions in the pack, output (n, heads, dim))
        if self._dec:
            q = query[0][:, self._dec_idx, :].transpose(0, 1).unsqueeze(2)  # (S, heads, 1, dim)
            keys = torch.nn.utils.rnn.pad_sequence([e.kv.keys[local][0, :, : e.past + 1, :].transpose(0, 1)  # type: ignore[index]
                                                    for e in self._dec], batch_first=True).transpose(1, 2)  # fmt: skip
            values = torch.nn.utils.rnn.pad_sequence([e.kv.values[local][0, :, : e.past + 1, :].transpose(0, 1)  # type: ignore[index]
                                                      for e in self._dec], batch_first=True).transpose(1, 2)  # fmt: skip
            out, _ = base(module, q, keys, values, self._decode_mask(kind), **kwargs)
            pieces.append((self._dec_idx, out[:, 0]))
        for i, e in enumerate(self._pre):
            q = query[:, :, e.offset : e.offset + e.tokens, :]
            end = e.past + e.tokens
            out, _ = base(module, q, e.kv.keys[local][..., :end, :], e.kv.values[local][..., :end, :],  # type: ignore[index]
                          self._chunk_mask(kind, i), **kwargs)  # fmt: skip
            pieces.append((torch.arange(e.offset, e.offset + e.tokens, device=self.device), out[0]))
        first = pieces[0][1]
        result = first.new_empty((self.total, *first.shape[1:]))
        for where, out in pieces:
            result[where] = out
        return result.unsqueeze(0)

    def finish(self) -> None:
        """Every entry's cache now holds its new tokens."""
        for e in self.entries:
            e.kv.length = e.past + e.tokens

    def last_rows(self, seqs: tuple[SeqChunk, ...]) -> list[int]:
        """Indices in the pack of the last token of every chunk that asks for logits."""
        return [e.offset + e.tokens - 1 for e, c in zip(self.entries, seqs) if c.logits]
