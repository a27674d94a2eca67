"""The OpenAI request bodies noodle accepts, and OpenAI's error JSON.

Bodies are validated strictly (``"1"`` is not an integer) with pydantic; unknown keys
are ignored, as OpenAI-compatible servers do, but known options that noodle cannot honour
(``n > 1``, non-zero penalties) are refused with a 400 that names the field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from noodle.sizes import MAX_LOGPROBS

__all__ = [
    "ApiError",
    "CompletionRequest",
    "ChatCompletionRequest",
    "ChatMessage",
    "StreamOptions",
    "ResponseFormat",
    "Tool",
    "MAX_TOOLS",
    "error_body",
    "parse_body",
]

MAX_STOPS = 4
MAX_STOP_CHARS = 256
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_TOOLS = 128
FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class ApiError(Exception):
    """An error the HTTP layer turns into OpenAI's error JSON with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` as OpenAI writes it."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _TextPart(_Body):
    type: Literal["text"]
    text: str


class _CalledFunction(_Body):
    name: str = Field(min_length=1)
    arguments: str


class ToolCall(_Body):
    """A tool call an assistant message made (as a client sends it back)."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: _CalledFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class _Sampling(_Body):
    """Options shared by completions and chat completions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Stop | list[Stop] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> _Sampling:
        if self.n != 1:
            raise ValueError(f"n: noodle returns one choice per request, got n={self.n}; send n=1 (or leave it out)")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOPS:
            raise ValueError(f"stop: at most {MAX_STOPS} stop strings, got {len(self.stop)}")
        for field in ("presence_penalty", "frequency_penalty"):
            if getattr(self, field) != 0.0:
                raise ValueError(f"{field}: not supported by noodle, got {getattr(self, field)}; send 0 or leave it out")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream: true")
        return self

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_count(self) -> int | None:
        """How many alternatives per token the response lists (``None``: no log probabilities)."""
        return None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise ValueError("prompt: empty list; send a string or a list of token ids")
            if isinstance(self.prompt[0], (str, list)) and len(self.prompt) != 1:
                raise ValueError(f"prompt: noodle takes one prompt per request, got {len(self.prompt)}")
        if self.echo:
            raise ValueError("echo: not supported by noodle; leave it out")
        if self.suffix:
            raise ValueError("suffix: not supported by noodle; leave it out")
        if self.best_of not in (None, 1):
            raise ValueError(f"best_of: noodle returns one choice, got {self.best_of}; send 1 or leave it out")
        return self

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, str):
            return p
        if p and isinstance(p[0], (str, list)):
            return p[0]
        return cast("list[int]", p)  # a list of token ids: mypy cannot narrow a list's type by its first item

    def logprobs_count(self) -> int | None:
        return self.logprobs


class _JsonSchemaFormat(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """``response_format``: free text, any JSON object, or JSON valid for a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema: required with type json_schema")
        return self


class _FunctionDef(_Body):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    """One entry of ``tools``: a function the model may call."""

    type: Literal["function"]
    function: _FunctionDef


class _NamedFunction(_Body):
    name: str = Field(min_length=1)


class _NamedToolChoice(_Body):
    type: Literal["function"]
    function: _NamedFunction


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | _NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError(f"top_logprobs: needs logprobs: true, got top_logprobs={self.top_logprobs} without it")
        return self

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatCompletionRequest:
        tools = self.tools or []
        if len(tools) > MAX_TOOLS:
            raise ValueError(f"tools: at most {MAX_TOOLS} tools, got {len(tools)}")
        names = [t.function.name for t in tools]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"tools: function {dup!r} is defined twice")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not tools:
            raise ValueError("tool_choice: needs tools to choose from; send tools or leave tool_choice out")
        if isinstance(choice, _NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: function {choice.function.name!r} is not among tools {names}")
        if self.forced_tools() and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: cannot be combined with a tool_choice that forces a call")
        seen: set[str] = set()
        for i, m in enumerate(self.messages):
            for call in m.tool_calls or []:
                if m.role != "assistant":
                    raise ValueError(f"messages[{i}].tool_calls: only assistant messages make tool calls")
                seen.add(call.id)
            if m.role == "tool":
                if m.tool_call_id is None:
                    raise ValueError(f"messages[{i}].tool_call_id: required in a tool message")
                if m.tool_call_id not in seen:
                    raise ValueError(f"messages[{i}].tool_call_id: {m.tool_call_id!r} answers no earlier assistant "
                                     "tool call")  # fmt: skip
        return self

    def active_tools(self) -> list[Tool]:
        """The tools the model is shown (none with ``tool_choice: "none"``)."""
        return [] if self.tool_choice == "none" else list(self.tools or [])

    def forced_tools(self) -> list[Tool] | None:
        """The tools one of which must be called (``required`` or a named function); ``None``: no call forced."""
        choice, tools = self.tool_choice, list(self.tools or [])
        if choice == "required":
            return tools
        if isinstance(choice, _NamedToolChoice):
            return [t for t in tools if t.function.name == choice.function.name]
        return None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def _field_names() -> frozenset[str]:
    models = (StreamOptions, _TextPart, ChatMessage, CompletionRequest, ChatCompletionRequest, ResponseFormat,
              _JsonSchemaFormat, _FunctionDef, Tool, _NamedFunction, _NamedToolChoice, ToolCall, _CalledFunction)
    return frozenset(f.alias or name for m in models for name, f in m.model_fields.items())


def _param(loc: tuple[Any, ...]) -> str:
    """``messages[0].content`` from a pydantic location, leaving out union-member tags like ``list[int]``."""
    fields = _field_names()
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in fields:
            out += f".{p}" if out else p
    return out


def parse_body(raw: bytes, model: type[_Body]) -> Any:
    """Parse and validate a JSON body, or raise a 400 :class:`ApiError` naming the field."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, an integer of 4,300+ digits
        raise ApiError(400, f"body: not valid JSON ({str(exc)[:200]}); send a JSON object", param=None,
                       code="invalid_json") from None  # fmt: skip
    if not isinstance(data, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(data).__name__}", code="invalid_type")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # of a union's branches, the one that got furthest into the value names the field best
        err = max(errors, key=lambda e: sum(c in ".[" for c in _param(e["loc"])))
        param = _param(err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "value_error" and ":" in msg.split(" ")[0]:
            field, _, rest = msg.partition(": ")
            param, msg = field, rest
        elif err["type"] == "missing":
            msg = "required field is missing"
        more = f" (+{len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
        raise ApiError(400, f"{param or 'body'}: {msg}{more}", param=param or None, code="invalid_value") from None
    except RecursionError:
        raise ApiError(400, "body: nested too deeply", code="invalid_value") from None
