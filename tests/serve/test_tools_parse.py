"""Reading tool calls out of a reply, and tools into templates that do or do not know them."""

from __future__ import annotations

import json

import pytest

from noodle.serve.grammar import Grammars
from noodle.serve.protocol import ApiError, ChatMessage, Tool
from noodle.serve.tools import might_be_tool_call, parse_tool_calls, template_messages

NAMES = {"get_weather", "get_time"}
TOOL = Tool.model_validate({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}})


def test_tagged_blocks_with_leading_content() -> None:
    text = ('Let me look.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"utc\\"}"}')  # second block unclosed
    content, calls = parse_tool_calls(text, NAMES)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("get_time", {"zone": "utc"})]  # fmt: skip
    assert len({c.id for c in calls}) == 2


def test_bare_json_object_and_list() -> None:
    _, one = parse_tool_calls(' {"name": "get_time", "parameters": {"zone": "cet"}}', NAMES)
    assert [(c.name, json.loads(c.arguments)) for c in one] == [("get_time", {"zone": "cet"})]
    _, two = parse_tool_calls('[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {}}]', NAMES)
    assert [c.name for c in two] == ["get_time", "get_weather"]


@pytest.mark.parametrize("text", ['{"name": "rm_rf", "arguments": {}}', '{"city": "Paris"}', "<tool_call>{oops</tool_call>",
                                  "It is sunny.", '{"name": "get_time", "arguments": [1]}'])  # fmt: skip
def test_not_a_call_stays_text(text: str) -> None:
    assert parse_tool_calls(text, NAMES) == (text, [])


def test_might_be_tool_call_holds_only_candidates() -> None:
    assert might_be_tool_call("  ") and might_be_tool_call("<tool") and might_be_tool_call("{")
    assert not might_be_tool_call("Hello") and not might_be_tool_call("<b>")


def test_template_without_tools_gets_a_system_message_and_text_calls() -> None:
    msgs = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Weather?"),
            ChatMessage.model_validate({"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]}),
            ChatMessage(role="tool", content="3 C", tool_call_id="c1")]  # fmt: skip
    plain = template_messages(msgs, [TOOL], knows_tools=False)
    assert plain[0]["content"].startswith("Be brief.") and '"get_weather"' in plain[0]["content"]
    assert plain[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    assert plain[3] == {"role": "tool", "content": "3 C", "tool_call_id": "c1"}
    native = template_messages(msgs, [TOOL], knows_tools=True)
    assert native[0]["content"] == "Be brief." and native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}


def test_no_grammar_library_is_a_501_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Grammars, "available", staticmethod(lambda: False))
    with pytest.raises(ApiError) as err:
        Grammars(object(), 10, [0]).json_object("response_format")
    assert err.value.status == 501 and err.value.message.startswith("response_format: ") and "xgrammar" in err.value.message
