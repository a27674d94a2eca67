"""JSON constrained decoding for ``response_format`` and forced tool calls, compiled by xgrammar.

xgrammar was the cheapest of the three maintained libraries per token on this CPU
(``bench/grammar_libs.py``: 0.023 ms p50 for a 49k-vocabulary mask) and is an optional dependency of
the ``exec`` extra: without it a request that needs a grammar gets a 501 naming the field.
Grammars are compiled with compact separators and no free whitespace, so even a random-weight model
cannot wander in whitespace; and since compact JSON never holds a raw control character, tokens that
spell one are masked too (xgrammar's string rule lets a tab through, which ``json.loads`` refuses). Each request gets its own matcher (:class:`XgrammarConstraint`), which
the sampler applies to that request's row only (:mod:`noodle.executors.constraint`).

A grammar also carries a lower bound on the tokens any complete reply takes
(:mod:`noodle.serve.schemabound`): a request whose ``max_tokens`` is below it gets a 400 naming that
field (:meth:`XgrammarConstraint.check_room`). One that passes may still run out of tokens: it ends
with ``finish_reason: "length"`` and the text so far, which is not complete JSON.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Sequence
from typing import Any

import torch

from noodle.serve.protocol import ApiError
from noodle.serve.schemabound import min_json_chars, min_tokens

__all__ = ["Grammars", "XgrammarConstraint", "check_schema", "MAX_SCHEMA_CHARS"]

MAX_SCHEMA_CHARS = 100_000


def check_schema(schema: Any, param: str) -> None:
    """A 400 naming ``param`` when ``schema`` is not a JSON schema (an object, valid for its metaschema)."""
    if not isinstance(schema, dict):
        raise ApiError(400, f"{param}: a JSON schema is an object, got {type(schema).__name__}", param=param,
                       code="invalid_value")  # fmt: skip
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_CHARS:
        raise ApiError(400, f"{param}: {size} characters of schema, at most {MAX_SCHEMA_CHARS}", param=param,
                       code="invalid_value")  # fmt: skip
    if importlib.util.find_spec("jsonschema") is None:
        return  # xgrammar's compiler still refuses what it cannot read
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        raise ApiError(400, f"{param}{where}: not a valid JSON schema ({exc.message[:200]})", param=param,
                       code="invalid_value") from None  # fmt: skip


class _State:
    def __init__(self, owner: XgrammarConstraint) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self._owner = owner
        self._matcher = xgr.GrammarMatcher(owner.compiled, override_stop_tokens=list(owner.stop_ids) or None)
        self._bits = xgr.allocate_token_bitmask(1, owner.vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        out = logits.detach().float().cpu().clone()
        self._matcher.fill_next_token_bitmask(self._bits)
        n = self._owner.vocab_size
        self._xgr.apply_token_bitmask_inplace(out[:, :n], self._bits, vocab_size=n)
        out[:, self._owner.banned] = float("-inf")
        if out.shape[-1] > n:
            out[:, n:] = float("-inf")
        if not bool(torch.isfinite(out).any()):
            raise ValueError("the grammar allows no next token")
        return out

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(int(token)):
            raise ValueError(f"token {token} breaks the request's grammar")


class XgrammarConstraint:
    """A compiled grammar; :meth:`start` gives each sequence its own matcher.

    ``min_chars``: characters every complete reply has at least; ``longest``: bytes of the longest token
    the grammar can emit; ``source``: the request field the grammar came from.
    """

    def __init__(self, compiled: Any, vocab_size: int, stop_ids: Sequence[int], banned: torch.Tensor, *,
                 min_chars: int = 1, longest: int = 1, source: str = "response_format") -> None:  # fmt: skip
        self.compiled = compiled
        self.vocab_size = vocab_size
        self.stop_ids = tuple(stop_ids)
        self.banned = banned  # token ids that spell a control character
        self.min_chars, self.longest, self.source = min_chars, longest, source

    @property
    def min_tokens(self) -> int:
        """Tokens any complete reply takes at least."""
        return min_tokens(self.min_chars, self.longest)

    def check_room(self, max_tokens: int, param: str, requested: bool = True) -> None:
        """A 400 naming ``param`` when ``max_tokens`` cannot hold any reply the grammar allows."""
        need = self.min_tokens
        if max_tokens >= need:
            return
        given = f"{max_tokens} tokens" if requested else f"{max_tokens} tokens (what the context leaves after the prompt)"
        raise ApiError(400, f"{param}: {given} cannot hold any reply that {self.source} allows: its shortest JSON "
                       f"is {self.min_chars} characters, at least {need} tokens of this tokenizer (whose longest "
                       f"token is {self.longest} bytes); raise {param} to at least {need}", param=param,
                       code="invalid_value")  # fmt: skip

    def start(self) -> _State:
        return _State(self)


class Grammars:
    """Compiles JSON grammars for one tokenizer; the tokenizer table is built on first use."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab = vocab_size
        self._stop = tuple(int(i) for i in stop_ids)
        self._compiler: Any = None
        self._banned = torch.zeros(0, dtype=torch.long)
        self._longest = 1
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("xgrammar") is not None

    def _get_compiler(self, param: str) -> Any:
        if not self.available():
            raise ApiError(501, f"{param}: constrained decoding needs the xgrammar package, which this server "
                           "does not have (pip install 'noodle[grammar]'); leave it out", type="not_implemented",
                           param=param, code="grammar_unavailable")  # fmt: skip
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab,
                                                          stop_token_ids=list(self._stop) or None)  # fmt: skip
                self._banned = torch.tensor([i for i, t in enumerate(info.decoded_vocab)
                                             if i not in self._stop and any(b < 0x20 for b in t)], dtype=torch.long)  # fmt: skip
                silent = {*self._stop, *info.special_token_ids}  # tokens the grammar never lets spell text
                self._longest = max((len(t) for i, t in enumerate(info.decoded_vocab) if i not in silent), default=1)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def json_schema(self, schema: dict[str, Any], param: str) -> XgrammarConstraint:
        """The grammar of JSON text valid for ``schema``; a 400 naming ``param`` if it cannot be compiled."""
        compiler = self._get_compiler(param)
        try:
            compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError for unsupported schemas
            raise ApiError(400, f"{param}: the schema cannot be compiled to a grammar ({str(exc)[:200]})",
                           param=param, code="invalid_value") from None  # fmt: skip
        return XgrammarConstraint(compiled, self._vocab, self._stop, self._banned, min_chars=min_json_chars(schema),
                                  longest=self._longest, source=param)  # fmt: skip

    def json_object(self, param: str) -> XgrammarConstraint:
        """The grammar of any JSON object."""
        return self.json_schema({"type": "object"}, param)
