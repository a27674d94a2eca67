"""A lower bound on the length of any JSON text a schema accepts, to refuse hopeless ``max_tokens`` up front.

:func:`min_json_chars` walks a JSON schema and returns a number of characters that every compact
JSON text valid for it (the form :mod:`noodle.serve.grammar` constrains decoding to: no free
whitespace, ``,`` and ``:`` separators) has at least. It is a bound, not the exact minimum: whatever
it does not model (``$ref``, ``pattern``, ``format``, ``minimum`` of numbers, ``not``,
``if``/``then``, ``minProperties``) counts as the shortest JSON value, one character. Each token
spells at most as many characters as the tokenizer's longest entry has bytes, so a reply needs at
least ``ceil(chars / longest)`` tokens (:func:`min_tokens`); a request whose ``max_tokens`` is below
that can never finish its document, and gets a 400 instead of a truncated reply.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["min_json_chars", "min_tokens"]

_MAX_DEPTH = 64  # deeper schemas count as one character below this depth (still a lower bound)
_LITERAL = {"null": 4, "boolean": 4, "integer": 1, "number": 1, "string": 2, "array": 2, "object": 2}


def _compact(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _nonneg_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _of_type(kind: str, schema: dict[str, Any], depth: int) -> int:
    if kind == "string":
        return 2 + _nonneg_int(schema.get("minLength"))
    if kind == "array":
        n = _nonneg_int(schema.get("minItems"))
        items = schema.get("items")
        each = _walk(items, depth + 1) if isinstance(items, dict) and "prefixItems" not in schema else 1
        return 2 + n * each + max(0, n - 1)
    if kind == "object":
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        required = [r for r in dict.fromkeys(schema.get("required") or []) if isinstance(r, str)]
        members = [_compact(r) + 1 + _walk(props.get(r, {}), depth + 1) for r in required]
        return 2 + sum(members) + max(0, len(members) - 1)
    return _LITERAL.get(kind, 1)


def _walk(schema: Any, depth: int) -> int:
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return 1
    if "const" in schema:
        return _compact(schema["const"])
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return min(_compact(v) for v in enum)
    bounds = [1]
    kind = schema.get("type")
    if isinstance(kind, str):
        bounds.append(_of_type(kind, schema, depth))
    elif isinstance(kind, list) and kind and all(isinstance(k, str) for k in kind):
        bounds.append(min(_of_type(k, schema, depth) for k in kind))
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            bounds.append(min(_walk(o, depth + 1) for o in options))
    every = schema.get("allOf")
    if isinstance(every, list):
        bounds.extend(_walk(o, depth + 1) for o in every)
    return max(bounds)  # the text satisfies every keyword at once


def min_json_chars(schema: Any) -> int:
    """Characters every compact JSON text valid for ``schema`` has at least (>= 1)."""
    return _walk(schema, 0)


def min_tokens(chars: int, longest_token: int) -> int:
    """Tokens a reply of at least ``chars`` characters needs when no token spells more than ``longest_token``."""
    return -(-chars // max(1, longest_token))
