"""The stage runner: a contiguous slice of a decoder-only model plus one KV cache per session.

:class:`StageRunner` runs what a plan's :class:`noodle.types.Stage` (a unit range on a
node) names. Every executor runs stage runners; only the way messages travel between
them differs.
A stage takes a :class:`~noodle.executors.messages.StageInput` (token ids for the
first stage, hidden states for the others) and returns a
:class:`~noodle.executors.messages.StageOutput` (hidden states, or logits from
the stage holding ``lm_head``). It recomputes what the blocks need besides the
hidden states from the session's 2-D padding mask:

- position ids ``cumsum(mask) - 1`` (padding positions set to 0), as
  ``generate`` makes them under left padding;
- the 4-D causal mask per attention kind (full, sliding, chunked), built
  against this stage's *first* layer of that kind: the session's
  ``DynamicCache`` is indexed by global layer numbers, and sizing the mask
  against layer 0 (which another stage holds) is silently wrong under padding;
- rotary embeddings from the stage's own rotary copy (one table per attention kind
  where the rotary helper takes the layer type, as Gemma 3's does);
- the family's top-level glue (:mod:`noodle.models.glue`): ALiBi biases, embedding
  multipliers, logit scaling and soft-capping, the block's KV-cache keyword.

A *packed* step (``StageInput.seqs``, continuous batching) carries many sequences' new tokens in
one forward; :mod:`noodle.executors.packed` keeps their KV caches and their attention apart.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from noodle.errors import ExecutorError, ModelError
from noodle.executors.messages import StageInput, StageOutput
from noodle.executors.packed import PACKABLE_ATTENTION, PackedStep, SeqKV, packed_attention
from noodle.executors.slicing import ModelSlice, load_slice
from noodle.models.compat import make_mask
from noodle.models.conformance import KEYS_BACK_TO_BACK, UNPACKED
from noodle.models.quant import apply_format
from noodle.models.glue import alibi_bias, block_call, embed_multiplier, logits_glue, positions_call, uses_alibi

__all__ = ["StageRunner", "Session"]

_MASK_FUNCS = {
    "full_attention": "create_causal_mask",
    "sliding_attention": "create_sliding_window_causal_mask",
    "chunked_attention": "create_chunked_causal_mask",
}


@dataclass
class Session:
    """One generation's state on one stage: its KV cache and 2-D padding mask."""

    cache: Any
    mask: torch.Tensor | None  # (batch, seen) 0/1; None while there is no padding
    seen: int = 0


def _layer_kind(config: Any, layer: int) -> str:
    types = getattr(config, "layer_types", None)
    if types:
        return str(types[layer])
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


class StageRunner:
    """Units ``[start, end)`` of the model in ``folder``, with a KV cache per session.

    Args:
        folder: a model folder (``config.json`` + safetensors).
        start, end: the half-open unit range (0 is ``embed``, the last is ``lm_head``).
        name: a label for reports and errors (the plan's node id).
        format: the weight format of the slice (:mod:`noodle.models.quant`); activations in and out stay float32.
        device: the device the slice runs on, for the format's kernels (``cpu`` or ``cuda``).
    """

    def __init__(self, folder: str | Path, start: int, end: int, *, name: str = "", format: str = "float32",
                 device: str = "cpu") -> None:
        self.folder = Path(folder)
        self.name = name or f"stage[{start},{end})"
        self.slice: ModelSlice = load_slice(self.folder, start, end)
        apply_format(self.slice, format, device, where=self.name)
        self.format = format
        self._dtype = torch.bfloat16 if format == "bfloat16" else None
        self.start, self.end = start, end
        cfg = self.slice.config
        self.config = cfg
        self.num_units = len(self.slice.layout.unit_names)
        self.layers = [i for i, _ in self.slice.blocks]
        self._kinds: dict[str, int] = {}  # attention kind -> first global layer of that kind here
        self._block_kinds: list[str] = []
        for i in self.layers:
            kind = _layer_kind(cfg, i)
            if kind not in _MASK_FUNCS:
                raise ModelError(f"layer {i} uses {kind!r} attention; stages support {', '.join(_MASK_FUNCS)}")
            self._kinds.setdefault(kind, i)
            self._block_kinds.append(kind)
        self._sessions: dict[str, Session] = {}
        self._seqs: dict[str, SeqKV] = {}  # packed steps' sequences (continuous batching)
        self._packing = threading.Lock()
        self._layer_index = {g: k for k, g in enumerate(self.layers)}
        blocks = [b for _, b in self.slice.blocks]
        self._call = block_call(blocks[0], self.slice.rotary) if blocks else None
        self._alibi = self._call is not None and self._call.alibi and uses_alibi(cfg)
        self._attn = str(getattr(cfg, "_attn_implementation", None))
        self.packable = (not (self._call is not None and self._call.alibi) and self._attn in PACKABLE_ATTENTION
                         and getattr(cfg, "model_type", "") not in UNPACKED)  # fmt: skip
        self._ragged = getattr(cfg, "model_type", "") not in KEYS_BACK_TO_BACK
        # the configs the attention modules read their implementation from (switched during a packed step)
        self._attn_configs = list({id(c): c for b in blocks for m in b.modules()
                                   if (c := getattr(m, "config", None)) is not None and hasattr(c, "_attn_implementation")}.values())
        self._embed_mult = embed_multiplier(cfg)
        self._logits = logits_glue(cfg)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.num_units

    @property
    def units(self) -> list[str]:
        return self.slice.layout.unit_names[self.start : self.end]

    @property
    def io_dtype(self) -> torch.dtype:
        """The dtype of the hidden states this stage takes and hands on (float32 whenever a format is applied)."""
        if self.format != "float32":
            return torch.float32
        return next((p.dtype for m in self.slice.modules() for p in m.parameters()), torch.float32)

    def param_bytes(self) -> int:
        """Bytes of weights this stage holds."""
        return self.slice.param_bytes()

    def cache_bytes(self, session: str) -> int:
        """Bytes of KV cache held for ``session`` (0 if unknown)."""
        if session in self._seqs:
            return self._seqs[session].nbytes()
        state = self._sessions.get(session)
        if state is None:
            return 0
        total = 0
        for layer in state.cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    def sessions(self) -> list[str]:
        return [*self._sessions, *self._seqs]

    def end_session(self, session: str) -> None:
        """Drop a session's (or a packed sequence's) KV cache (unknown ids are ignored)."""
        self._sessions.pop(session, None)
        self._seqs.pop(session, None)

    # -- running -------------------------------------------------------------------------------
    def _begin(self, msg: StageInput) -> Session:
        from transformers import DynamicCache

        state = Session(cache=DynamicCache(config=self.config), mask=None)
        self._sessions[msg.session] = state
        return state

    def _check(self, msg: StageInput) -> Session:
        data = msg.data
        want = 2 if self.is_first else 3
        if data.dim() != want:
            what = "token ids (batch, tokens)" if self.is_first else "hidden states (batch, tokens, hidden)"
            raise ExecutorError(f"{self.name}: expects {what}, got a tensor of shape {tuple(data.shape)}")
        if msg.attention_mask is not None and tuple(msg.attention_mask.shape) != tuple(data.shape[:2]):
            raise ExecutorError(
                f"{self.name}: attention_mask shape {tuple(msg.attention_mask.shape)} does not match "
                f"the input's (batch, tokens) {tuple(data.shape[:2])}"
            )
        if msg.prefill:
            return self._begin(msg)
        state = self._sessions.get(msg.session)
        if state is None:
            raise ExecutorError(f"{self.name}: unknown session {msg.session!r}; start it with a prefill step")
        if state.mask is not None and state.mask.shape[0] != msg.batch_size:
            raise ExecutorError(f"{self.name}: session {msg.session!r} has batch {state.mask.shape[0]}, got {msg.batch_size}")
        return state

    @staticmethod
    def _grow_mask(state: Session, new: torch.Tensor | None, batch: int, tokens: int) -> None:
        if new is None and state.mask is None:
            return
        if new is None:
            new = torch.ones(batch, tokens, dtype=torch.long)
        new = new.to(torch.long)
        if state.mask is None:
            old = torch.ones(batch, state.seen, dtype=torch.long)
            state.mask = torch.cat([old, new], dim=1)
        else:
            state.mask = torch.cat([state.mask, new], dim=1)

    def _positions(self, state: Session, batch: int, tokens: int) -> torch.Tensor:
        if state.mask is None:
            return torch.arange(state.seen, state.seen + tokens).unsqueeze(0)
        pos = state.mask.cumsum(-1) - 1
        pos = pos.masked_fill(state.mask == 0, 0)
        return pos[:, -tokens:]

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor | None = None
        for kind, mod in self.slice.embed:
            if kind == "tokens":
                hidden = mod(ids)
                if self._embed_mult is not None:
                    hidden = hidden * self._embed_mult
            elif hidden is None:
                raise ModelError(f"{self.name}: the token embedding must come first in the embed unit")
            elif kind == "positions":
                hidden = hidden + positions_call(mod)(positions)
            else:
                hidden = mod(hidden)
        if hidden is None:  # layout_of guarantees a token embedding; a hand-built slice may not
            raise ModelError(f"{self.name}: the embed unit has no token embedding")
        return hidden

    @torch.inference_mode()
    def step(self, msg: StageInput) -> StageOutput:
        """Run this stage on one step (prefill or decode) of a session, or on a packed step of many."""
        if msg.data.device.type != "cpu" and type(self) is StageRunner:  # from a stage on an accelerator
            mask = msg.attention_mask
            msg = replace(msg, data=msg.data.cpu(), attention_mask=None if mask is None else mask.cpu())
        if msg.seqs:
            return self._step_packed(msg)
        state = self._check(msg)
        batch, tokens = msg.batch_size, msg.new_tokens
        self._grow_mask(state, msg.attention_mask, batch, tokens)
        positions = self._positions(state, batch, tokens)
        hidden = self._embed(msg.data, positions) if self.is_first else msg.data
        if self._dtype is not None:
            hidden = hidden.to(self._dtype)

        if self.slice.blocks:
            masks = {
                kind: make_mask(_MASK_FUNCS[kind], self.config, hidden, state.mask, state.cache, positions, first)
                for kind, first in self._kinds.items()
            }
            call = self._call
            if call is None:  # set whenever the slice holds blocks
                raise ModelError(f"{self.name}: blocks without a calling convention")
            rotary: dict[str, Any] = {}
            if self.slice.rotary is not None:
                for kind in self._kinds:
                    args = (kind,) if call.rotary_by_kind else ()
                    rotary[kind] = self.slice.rotary(hidden, positions, *args)
            extra: dict[str, Any] = {call.cache_kw: state.cache, "use_cache": True}
            if call.position_ids:
                extra["position_ids"] = positions
            if call.alibi:
                full = state.mask if state.mask is not None else torch.ones(batch, state.seen + tokens, dtype=torch.long)
                extra["alibi"] = alibi_bias(self.slice.blocks[0][1], self.config, full, hidden.dtype) if self._alibi else None
            for (_, block), kind in zip(self.slice.blocks, self._block_kinds):
                if kind in rotary:
                    extra["position_embeddings"] = rotary[kind]
                out = block(hidden, attention_mask=masks[kind], **extra)
                hidden = out[0] if isinstance(out, tuple) else out
        state.seen += tokens

        if not self.is_last:
            return StageOutput(msg.session, hidden if self._dtype is None else hidden.float(), msg.attention_mask,
                               is_logits=False)
        if not msg.all_logits:
            hidden = hidden[:, -1:, :]
        return StageOutput(msg.session, self._head(hidden), msg.attention_mask, is_logits=True)

    def _device(self) -> torch.device:
        return next((p.device for m in self.slice.modules() for p in m.parameters()), torch.device("cpu"))

    def _step_packed(self, msg: StageInput) -> StageOutput:
        n = sum(c.tokens for c in msg.seqs)
        data = msg.data
        want = 2 if self.is_first else 3
        if data.dim() != want or data.shape[0] != 1 or data.shape[1] != n:
            raise ExecutorError(f"{self.name}: a packed step of {len(msg.seqs)} sequences and {n} tokens needs data of "
                                f"shape (1, {n}{')' if self.is_first else ', hidden)'}, got {tuple(data.shape)}")  # fmt: skip
        if msg.exact or not self.packable:
            return self._step_each(msg)
        with self._packing:  # one packed step at a time on a stage (its attention configs are switched)
            return self._run_packed(msg, data)

    def _run_packed(self, msg: StageInput, data: torch.Tensor) -> StageOutput:
        step = PackedStep.begin(msg.seqs, self._seqs, self._layer_index, self._device(), self.name)
        positions = step.positions()
        hidden = self._embed(data, positions) if self.is_first else data
        if self._dtype is not None:
            hidden = hidden.to(self._dtype)
        call = self._call
        if call is not None:
            step.ragged = self._ragged
            if self._ragged:
                step.prepare(self.config, dict(zip(self.layers, self._block_kinds)), self._attn, hidden.dtype)
                masks: dict[str, Any] = dict.fromkeys(self._kinds)  # each sequence is masked by noodle's attention
            else:
                masks = {kind: step.mask(kind, self.config, hidden.dtype, self._attn == "eager") for kind in self._kinds}
            rotary: dict[str, Any] = {}
            if self.slice.rotary is not None:
                for kind in self._kinds:
                    rotary[kind] = self.slice.rotary(hidden, positions, *((kind,) if call.rotary_by_kind else ()))
            extra: dict[str, Any] = {call.cache_kw: step.cache, "use_cache": True}
            if call.position_ids:
                extra["position_ids"] = positions
            with packed_attention(step, self._attn_configs if self._ragged else []):
                for (_, block), kind in zip(self.slice.blocks, self._block_kinds):
                    if kind in rotary:
                        extra["position_embeddings"] = rotary[kind]
                    out = block(hidden, attention_mask=masks[kind], **extra)
                    hidden = out[0] if isinstance(out, tuple) else out
        step.finish()
        if not self.is_last:
            return StageOutput(msg.session, hidden if self._dtype is None else hidden.float(), None, False, msg.seqs)
        hidden = hidden[:, step.last_rows(msg.seqs), :]
        return StageOutput(msg.session, self._head(hidden)[0].unsqueeze(1), None, True, msg.seqs)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        for mod in self.slice.final:
            hidden = mod(hidden)
        head = self.slice.head
        if head is None:
            raise ModelError(f"{self.name}: the last stage has no LM head")
        logits = head(hidden)
        if self._dtype is not None:
            logits = logits.float()
        return logits if self._logits is None else self._logits(logits)

    def _step_each(self, msg: StageInput) -> StageOutput:
        """A packed step, one sequence at a time (exact mode: each is ``generate`` on its own)."""
        outs: list[torch.Tensor] = []
        offset = 0
        for c in msg.seqs:
            out = self.step(StageInput(c.seq, msg.data[:, offset : offset + c.tokens], None, prefill=c.start))
            offset += c.tokens
            if not self.is_last or c.logits:
                outs.append(out.data)
        if not self.is_last:
            return StageOutput(msg.session, torch.cat(outs, dim=1), None, False, msg.seqs, True)
        vocab = int(self.config.get_text_config().vocab_size) if not outs else outs[0].shape[-1]
        data = torch.cat(outs, dim=0) if outs else torch.empty(0, 1, vocab)
        return StageOutput(msg.session, data, None, True, msg.seqs, True)

    def __repr__(self) -> str:
        return f"StageRunner({self.name!r}, units=[{self.start}, {self.end}), layers={self.layers})"
