"""JSON constrained decoding for ``response_format`` and forced tool calls, compiled by xgrammar.

xgrammar was the cheapest of the three maintained libraries per token on this CPU
(``bench/grammar_libs.py``: 0.023 ms p50 for a 49k-vocabulary mask) and is an optional dependency of
the ``exec`` extra: without it a request that needs a grammar gets a 501 naming the field.
Grammars are compiled with compact separators and no free whitespace, so even a random-weight model
cannot wander in whitespace; and since compact JSON never holds a raw control character, tokens that
spell one are masked too (xgrammar's string rule lets a tab through, which ``json.loads`` refuses). Each request gets its own matcher (:class:`XgrammarConstraint`), which
the sampler applies to that request's row only (:mod:`noodle.executors.constraint`).
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Sequence
from typing import Any

import torch

from noodle.serve.protocol import ApiError

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
    """A compiled grammar; :meth:`start` gives each sequence its own matcher."""

    def __init__(self, compiled: Any, vocab_size: int, stop_ids: Sequence[int], banned: torch.Tensor) -> None:
        self.compiled = compiled
        self.vocab_size = vocab_size
        self.stop_ids = tuple(stop_ids)
        self.banned = banned  # token ids that spell a control character

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
        return XgrammarConstraint(compiled, self._vocab, self._stop, self._banned)

    def json_object(self, param: str) -> XgrammarConstraint:
        """The grammar of any JSON object."""
        return self.json_schema({"type": "object"}, param)
