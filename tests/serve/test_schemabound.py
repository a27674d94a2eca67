"""The shortest-JSON bound: exact where it models a schema, never above a valid document anywhere."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noodle.serve.schemabound import min_json_chars, min_tokens
from noodle.serve.tools import forced_call_schema

from .grammar_model import PERSON, WEATHER


def compact(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


SHORTEST = [  # (schema, its shortest valid document)
    (PERSON, {"name": "", "age": 0, "ok": True, "kind": "cat"}),
    ({"type": "string", "minLength": 500}, "x" * 500),
    ({"type": "object", "properties": {"s": {"type": "string", "minLength": 40}}, "required": ["s"]}, {"s": "x" * 40}),
    ({"type": "array", "items": {"enum": ["ab", 1]}, "minItems": 3}, [1, 1, 1]),
    ({"type": ["null", "integer"]}, 0),
    ({"anyOf": [{"const": "long text"}, {"type": "boolean"}]}, True),
    ({"allOf": [{"type": "string", "minLength": 3}, {"type": "string", "minLength": 7}]}, "x" * 7),
    ({"type": "object"}, {}),
    ({"type": "object", "required": ["a"], "properties": {"a": {"type": "null"}}}, {"a": None}),
]  # fmt: skip


@pytest.mark.parametrize("schema, doc", SHORTEST)
def test_the_bound_is_the_shortest_document_where_the_schema_is_modelled(schema: dict[str, Any], doc: Any) -> None:
    jsonschema.validate(doc, schema)
    assert min_json_chars(schema) == compact(doc)


def test_a_forced_call_is_bounded_by_its_name_and_required_arguments() -> None:
    from noodle.serve.protocol import Tool

    schema = forced_call_schema([Tool.model_validate(WEATHER)])
    doc = {"name": "get_weather", "arguments": {"city": "", "unit": "c"}}
    jsonschema.validate(doc, schema)
    assert min_json_chars(schema) == compact(doc)


def test_unmodelled_keywords_count_as_the_shortest_value() -> None:
    assert min_json_chars({"$ref": "#/$defs/x", "$defs": {"x": {"type": "string", "minLength": 99}}}) == 1
    assert min_json_chars({"type": "integer", "minimum": 10**6}) == 1
    assert min_json_chars({"type": "string", "minLength": True}) == 2  # not a count: no bound from it
    assert min_json_chars(True) == 1 and min_json_chars({}) == 1
    deep: dict[str, Any] = {"type": "string", "minLength": 5}
    for _ in range(200):
        deep = {"type": "array", "items": deep, "minItems": 1}
    assert 1 <= min_json_chars(deep) <= 2 * 65 + 1  # cut at depth 64: still a lower bound


def test_min_tokens_rounds_up() -> None:
    assert [min_tokens(c, 8) for c in (1, 8, 9, 48, 49)] == [1, 1, 2, 6, 7]
    assert min_tokens(5, 0) == 5


# -- never above a valid document: a value, and a schema loosened from it that it satisfies ------------------

_scalar = st.one_of(st.none(), st.booleans(), st.integers(-999, 999), st.text(max_size=12))
_values = st.recursive(_scalar, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                       st.dictionaries(st.text(max_size=4), kids, max_size=4)),
                       max_leaves=12)  # fmt: skip


@st.composite
def _value_and_schema(draw: st.DrawFn, value: Any = None, depth: int = 0) -> tuple[Any, dict[str, Any]]:
    value = draw(_values) if depth == 0 else value
    kind = draw(st.sampled_from(["typed", "enum", "const", "anyOf", "allOf", "empty"]))
    if kind == "enum":
        return value, {"enum": [value, *draw(st.lists(_scalar, max_size=3))]}
    if kind == "const":
        return value, {"const": value}
    if kind == "empty" or depth > 4:
        return value, {}
    if kind in ("anyOf", "allOf"):
        _, inner = draw(_value_and_schema(value, depth + 1))
        other = {"type": "string", "minLength": 50} if kind == "anyOf" else {}
        return value, {kind: [inner, other]}
    if isinstance(value, bool) or value is None:
        return value, {"type": "boolean" if isinstance(value, bool) else "null"}
    if isinstance(value, int):
        return value, {"type": draw(st.sampled_from(["integer", "number"]))}
    if isinstance(value, str):
        return value, {"type": "string", "minLength": draw(st.integers(0, len(value)))}
    if isinstance(value, list):
        items = [draw(_value_and_schema(v, depth + 1))[1] for v in value]
        schema: dict[str, Any] = {"type": "array", "minItems": draw(st.integers(0, len(value)))}
        if items and all(i == items[0] for i in items):
            schema["items"] = items[0]
        return value, schema
    props = {k: draw(_value_and_schema(v, depth + 1))[1] for k, v in value.items()}
    required = draw(st.lists(st.sampled_from(sorted(value)), unique=True)) if value else []
    return value, {"type": "object", "properties": props, "required": required}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_value_and_schema())
def test_the_bound_never_exceeds_a_valid_document(pair: tuple[Any, dict[str, Any]]) -> None:
    value, schema = pair
    jsonschema.validate(value, schema)
    assert min_json_chars(schema) <= compact(value)
