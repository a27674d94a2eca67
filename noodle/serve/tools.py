"""Tool calling: tools into the chat template, the model's tool calls out of its text.

The tools reach the model through its chat template (``apply_chat_template(tools=...)``). A template
that never mentions ``tools`` (SmolLM2's, say) gets them in a system message instead, in the Hermes
form most tool-tuned models know: a ``<tools>`` list and the instruction to answer with
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Output forms parsed into ``tool_calls`` (:func:`parse_tool_calls`):

- one or more ``<tool_call>{json}</tool_call>`` blocks (Hermes, Qwen2.5, SmolLM3); text before the
  first block is the message's ``content``; a last block the model did not close is read too;
- the whole reply as bare JSON: one ``{"name", "arguments"}`` object (``parameters`` is read as
  ``arguments``) or a list of them (Llama 3.1's JSON tool calls).

A call naming a function that is not among the request's tools is left as text. When ``tool_choice``
forces a call (``required`` or a named function), decoding is constrained to the bare-JSON form of one
call whose ``arguments`` are valid for that function's ``parameters`` schema (:func:`forced_call_schema`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from noodle.serve.protocol import ChatMessage, Tool

__all__ = ["ParsedCall", "parse_tool_calls", "template_messages", "tools_for_template", "forced_call_schema",
           "template_knows_tools", "might_be_tool_call"]  # fmt: skip

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
OPEN_TAG = "<tool_call>"


@dataclass(frozen=True)
class ParsedCall:
    """One tool call read from the model's text: the function and its arguments as a JSON string."""

    name: str
    arguments: str
    id: str

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call_of(obj: Any, names: set[str]) -> ParsedCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False), f"call_{uuid.uuid4().hex[:24]}")


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[ParsedCall]]:
    """``(content, calls)`` read from a reply; ``calls`` is empty when the reply calls no known tool."""
    if OPEN_TAG in text:
        calls: list[ParsedCall] = []
        for block in _BLOCK.findall(text):
            try:
                call = _call_of(json.loads(block), names)
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        content = text[: text.index(OPEN_TAG)].strip()
        return (content or None), calls
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            obj = json.loads(stripped)
        except ValueError:
            return text, []
        items = obj if isinstance(obj, list) else [obj]
        parsed = [_call_of(o, names) for o in items]
        if parsed and all(c is not None for c in parsed):
            return None, [c for c in parsed if c is not None]
    return text, []


def might_be_tool_call(text: str) -> bool:
    """Whether a reply that starts with ``text`` may turn out to be a tool call (stream: hold it back)."""
    s = text.lstrip()
    return s[:1] in ("{", "[") or s.startswith(OPEN_TAG) or (bool(s) and OPEN_TAG.startswith(s)) or not s


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in str(template)


def tools_for_template(tools: list[Tool]) -> list[dict[str, Any]]:
    """OpenAI's tool objects as transformers' ``apply_chat_template(tools=...)`` takes them."""
    return [t.model_dump(exclude_none=True, by_alias=True) for t in tools]


def _system_text(tools: list[Tool]) -> str:
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools_for_template(tools))
    return ("You may call one or more functions to answer. The functions are listed in <tools></tools>:\n"
            f"<tools>\n{lines}\n</tools>\nTo call a function, reply with one <tool_call></tool_call> block per call, "
            'each holding a JSON object: <tool_call>{"name": <function name>, "arguments": <arguments object>}'
            "</tool_call>")  # fmt: skip


def _arguments(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def template_messages(messages: list[ChatMessage], tools: list[Tool], knows_tools: bool) -> list[dict[str, Any]]:
    """The messages as a chat template reads them; tool calls and results kept, or spelled out as text.

    With ``knows_tools`` the template gets ``tool_calls`` (arguments as objects) and ``tool_call_id``;
    otherwise assistant calls become ``<tool_call>`` text and, when tools are offered, a system message
    lists them (merged into the first system message if there is one).
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            if knows_tools:
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
            else:
                blocks = [json.dumps({"name": c.function.name, "arguments": _arguments(c.function.arguments)},
                                     ensure_ascii=False) for c in m.tool_calls]  # fmt: skip
                msg["content"] = "".join([msg["content"], *(f"{OPEN_TAG}{b}</tool_call>" for b in blocks)])
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    if tools and not knows_tools:
        text = _system_text(tools)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def forced_call_schema(tools: list[Tool]) -> dict[str, Any]:
    """The JSON schema of one call to one of ``tools``: ``{"name": <const>, "arguments": <its parameters>}``."""
    options = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                 "arguments": t.function.parameters or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]  # fmt: skip
    return options[0] if len(options) == 1 else {"anyOf": options}
