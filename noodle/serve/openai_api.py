"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

``/v1/responses`` (OpenAI's Responses API) is not served: a 404 error body says so and points to
chat completions. A response's ``id`` carries the request's ``X-Request-Id``.

Validation happens here (the HTTP edge): bodies through :mod:`noodle.serve.protocol`,
prompt length against the plan's context, the model id. Parsing and tokenizing run on a
thread, not on the event loop; a text longer than the context could hold even at the
tokenizer's longest token is refused before it is tokenized. Streaming responses are
server-sent events (``data: {json}`` blocks, ending with ``data: [DONE]``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from noodle.executors.constraint import TokenConstraint
from noodle.executors.generation import Sampling
from noodle.serve.grammar import Grammars, XgrammarConstraint, check_schema
from noodle.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse_body
from noodle.serve.requestid import request_id_of
from noodle.serve.runtime import Delta, Finish, Runtime, Stream
from noodle.serve.text import TokenPieces
from noodle.serve.tools import (ParsedCall, forced_call_schema, might_be_tool_call, parse_tool_calls, template_knows_tools,
                                template_messages, tools_for_template)  # fmt: skip

__all__ = ["ServedModel", "ServedModels", "openai_router", "COMPLETIONS_DEFAULT_MAX_TOKENS"]

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ServedModel:
    """What the routes need: the runtime, the model id, and when it was created."""

    def __init__(self, runtime: Runtime, model_id: str) -> None:
        self.runtime = runtime
        self.model_id = model_id
        self.created = int(time.time())
        self._max_chars: int | None = None
        self.pieces = TokenPieces(runtime.tokenizer)
        self.grammars = Grammars(runtime.tokenizer, runtime.limits.vocab_size, sorted(runtime.eos_ids))

    def max_prompt_chars(self) -> int:
        """Characters beyond which a text cannot fit the prompt limit, whatever it says (no need to tokenize it).

        Each token covers at most as many characters as its longest vocabulary entry spells out
        (a byte-level or byte-fallback entry spells at least one character per byte); x2 leaves room
        for normalizers that compose characters.
        """
        if self._max_chars is None:
            tok = self.runtime.tokenizer
            try:
                longest = max((len(t) for t in tok.get_vocab()), default=64)
            except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: a generous bound
                longest = 64
            self._max_chars = 2 * max(longest, 16) * (self.runtime.limits.prompt_tokens + 1) + 4096
        return self._max_chars

    def card(self) -> dict[str, Any]:
        ctx = self.runtime.limits.context_tokens
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "noodle",
                "max_model_len": ctx, "context_length": ctx}  # fmt: skip


class ServedModels:
    """The models one server answers, by id, in the order ``/v1/models`` lists them."""

    def __init__(self, models: Sequence[ServedModel]) -> None:
        self.by_id = {m.model_id: m for m in models}
        if len(self.by_id) != len(models) or not models:
            raise ValueError("served models need distinct ids, at least one")  # the CLI checks names first

    def get(self, name: str) -> ServedModel:
        """The model a request's ``model`` names; a 404 ``model_not_found`` listing the served ids otherwise."""
        sm = self.by_id.get(name)
        if sm is None:
            ids = ", ".join(repr(i) for i in self.by_id)
            raise ApiError(404, f"model: {name!r} is not served here; this server serves {ids}",
                           param="model", code="model_not_found")  # fmt: skip
        return sm


def _sampling(body: Any, constraint: TokenConstraint | None = None) -> Sampling:
    seed = 0 if body.seed is None else body.seed % 2**63
    return Sampling(temperature=body.temperature, top_p=body.top_p, seed=seed, logprobs=body.logprobs_count(),
                    constraint=constraint)  # fmt: skip


def _constraint(sm: ServedModel, body: ChatCompletionRequest) -> XgrammarConstraint | None:
    """The grammar a chat request's reply must follow (``response_format`` or a forced tool call), checked."""
    for i, tool in enumerate(body.tools or []):
        if tool.function.parameters is not None:
            check_schema(tool.function.parameters, f"tools[{i}].function.parameters")
    forced = body.forced_tools()
    if forced is not None:
        return sm.grammars.json_schema(forced_call_schema(forced), "tool_choice")
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return sm.grammars.json_object("response_format")
    assert fmt.json_schema is not None  # the protocol's validator
    schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {"type": "object"}
    check_schema(schema, "response_format.json_schema.schema")
    return sm.grammars.json_schema(schema, "response_format.json_schema.schema")


def _tokenize(tokenizer: Any, text: str, param: str, **kwargs: Any) -> list[int]:
    try:
        return list(tokenizer(text, **kwargs)["input_ids"]) if text else []
    except Exception as exc:  # noqa: BLE001 - e.g. lone surrogates the tokenizer cannot encode
        raise ApiError(400, f"{param}: the text cannot be tokenized ({type(exc).__name__}: {str(exc)[:120]})",
                       param=param, code="invalid_value") from None  # fmt: skip


def _check_chars(sm: ServedModel, chars: int, param: str) -> None:
    """A 400 ``context_length_exceeded`` for a text too long to fit the prompt limit, before tokenizing it."""
    bound = sm.max_prompt_chars()
    if chars > bound:
        lim = sm.runtime.limits
        raise ApiError(400, f"{param}: {chars} characters cannot fit this model's context of {lim.context_tokens} "
                       f"tokens (prompts up to {lim.prompt_tokens} tokens, at most {bound} characters); shorten it",
                       param=param, code="context_length_exceeded")  # fmt: skip


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    ids = _tokenize(tokenizer, text, "prompt")
    if not ids and getattr(tokenizer, "bos_token_id", None) is not None:
        ids = [int(tokenizer.bos_token_id)]
    if not ids:
        raise ApiError(400, "prompt: encodes to no tokens; send some text", param="prompt", code="invalid_value")
    return ids


def _completion_prompt(sm: ServedModel, body: CompletionRequest) -> list[int]:
    prompt = body.single_prompt()
    if isinstance(prompt, str):
        _check_chars(sm, len(prompt), "prompt")
        return _encode_text(sm.runtime.tokenizer, prompt)
    vocab = sm.runtime.limits.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt",
                       code="invalid_value")  # fmt: skip
    return list(prompt)


def _chat_prompt(sm: ServedModel, body: ChatCompletionRequest) -> list[int]:
    tok = sm.runtime.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ApiError(400, f"messages: the tokenizer of {sm.model_id!r} has no chat template; use /v1/completions, "
                       "or start noodle serve with --chat-template FILE", param="messages",
                       code="no_chat_template")  # fmt: skip
    tools = body.active_tools()
    knows = template_knows_tools(tok.chat_template)
    messages = template_messages(body.messages, tools, knows)
    _check_chars(sm, sum(len(json.dumps(m)) for m in messages), "messages")
    extra = {"tools": tools_for_template(tools)} if tools and knows else {}
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
    except Exception as exc:  # noqa: BLE001 - a template may raise anything (jinja's raise_exception, TypeError)
        raise ApiError(400, f"messages: the chat template rejected them ({str(exc)[:200]})", param="messages",
                       code="invalid_value") from None  # fmt: skip
    ids = _tokenize(tok, str(text), "messages", add_special_tokens=False)
    if not ids:
        raise ApiError(400, "messages: the chat template renders to no tokens", param="messages", code="invalid_value")
    return ids


def _max_tokens(sm: ServedModel, body: Any, prompt_len: int, default: int | None, param: str, prompt_param: str) -> int:
    requested = body.requested_tokens()
    lim = sm.runtime.limits
    if requested is None:
        room = lim.context_tokens - prompt_len
        requested = max(1, room if default is None else min(default, room))
    sm.runtime.check_length(prompt_len, requested, tokens_param=param, prompt_param=prompt_param)
    return requested


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(fin: Finish) -> dict[str, Any]:
    """OpenAI's usage; ``cached_tokens`` is 0: noodle reads every prompt (no prefix cache)."""
    return {"prompt_tokens": fin.prompt_tokens, "completion_tokens": fin.completion_tokens,
            "total_tokens": fin.prompt_tokens + fin.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip


def _finish_reason(fin: Finish) -> str:
    return "length" if fin.reason == "length" else "stop"


def _raise_for(fin: Finish) -> None:
    if fin.reason == "timeout":
        raise ApiError(504, f"request timed out: {fin.error}", type="timeout_error", code="request_timeout")
    if fin.reason in ("error", "cancelled"):
        raise ApiError(500, f"generation failed: {fin.error or fin.reason}", type="server_error", code="engine_error")


def _logprobs(pieces: TokenPieces, deltas: list[Delta], chat: bool, offset: int = 0) -> dict[str, Any]:
    """OpenAI's ``logprobs`` of a choice (or of one chunk), from the deltas that carry them.

    Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``; completions: the legacy
    ``tokens`` / ``token_logprobs`` / ``top_logprobs`` (the top tokens and the sampled one) / ``text_offset``.
    """
    content: list[dict[str, Any]] = []
    legacy: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    pos = offset
    for d in deltas:
        lp = d.logprobs
        if lp is not None and d.token is not None:
            text, raw = pieces(d.token)
            if chat:
                top = [{"token": t, "logprob": v, "bytes": b} for i, v in lp.top for t, b in (pieces(i),)]
                content.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
            else:
                legacy["tokens"].append(text)
                legacy["token_logprobs"].append(lp.logprob)
                legacy["top_logprobs"].append({**{pieces(i)[0]: v for i, v in lp.top}, text: lp.logprob})
                legacy["text_offset"].append(pos)
        pos += len(d.text)
    return {"content": content, "refusal": None} if chat else legacy


async def _collect(stream: Stream, request: Request) -> tuple[list[Delta], Finish]:
    deltas: list[Delta] = []
    async for ev in stream.events(request.is_disconnected):
        if isinstance(ev, Delta):
            deltas.append(ev)
        else:
            _raise_for(ev)
            return deltas, ev
    raise ApiError(499, "client closed the request", type="client_closed", code="client_closed")


def _tool_call_chunks(calls: list[ParsedCall]) -> list[dict[str, Any]]:
    """``delta.tool_calls`` as OpenAI streams them: id, type and name first, then the arguments."""
    out: list[dict[str, Any]] = []
    for i, c in enumerate(calls):
        out.append({"tool_calls": [{"index": i, "id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": ""}}]})  # fmt: skip
        out.append({"tool_calls": [{"index": i, "function": {"arguments": c.arguments}}]})
    return out


async def _stream_chunks(sm: ServedModel, stream: Stream, chat: bool, base: dict[str, Any], usage: bool,
                         tools: _ToolMode | None = None) -> AsyncIterator[str]:  # fmt: skip
    """SSE chunks; with ``tools``, text that may be a tool call is held back until it is parsed at the end."""
    extra = {"usage": None} if usage else {}

    def chunk(choice: dict[str, Any]) -> str:
        return _sse({**base, "choices": [{"index": 0, "logprobs": None, **choice}], **extra})

    def text_chunk(deltas: list[Delta], offset: int) -> str:
        lp = None if all(d.logprobs is None for d in deltas) else _logprobs(sm.pieces, deltas, chat, offset)
        text = "".join(d.text for d in deltas)
        return chunk({"delta": {"content": text}, "finish_reason": None, "logprobs": lp} if chat else
                     {"text": text, "finish_reason": None, "logprobs": lp})  # fmt: skip

    if chat:
        yield chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    offset = 0
    held: list[Delta] = []
    holding = tools is not None
    async for ev in stream.events():
        if isinstance(ev, Delta):
            if holding:
                held.append(ev)
                if (tools and tools.forced) or might_be_tool_call("".join(d.text for d in held)):
                    continue
                holding, ev_list, held = False, held, []
            else:
                ev_list = [ev]
            yield text_chunk(ev_list, offset)
            offset += sum(len(d.text) for d in ev_list)
            continue
        calls: list[ParsedCall] = []
        if held and tools is not None and ev.reason not in ("timeout", "error", "cancelled"):
            content, calls = tools.parse("".join(d.text for d in held))
            if calls:
                if content:
                    yield chunk({"delta": {"content": content}, "finish_reason": None})
                for delta in _tool_call_chunks(calls):
                    yield chunk({"delta": delta, "finish_reason": None})
            else:
                yield text_chunk(held, offset)
        if ev.reason in ("timeout", "error", "cancelled"):
            kind = "timeout_error" if ev.reason == "timeout" else "server_error"
            yield _sse({"error": {"message": f"generation ended: {ev.error or ev.reason}", "type": kind,
                                  "param": None, "code": ev.reason}})  # fmt: skip
        else:
            reason = "tool_calls" if calls else _finish_reason(ev)
            yield chunk({"delta": {}, "finish_reason": reason} if chat else {"text": "", "finish_reason": reason})
            if usage:
                yield _sse({**base, "choices": [], "usage": _usage(ev)})
        break
    yield "data: [DONE]\n\n"


class _ToolMode:
    """The tools a chat request offers, and how its reply is read for calls."""

    def __init__(self, names: set[str], forced: bool, parallel: bool) -> None:
        self.names, self.forced, self.parallel = names, forced, parallel

    @classmethod
    def of(cls, body: ChatCompletionRequest) -> _ToolMode | None:
        tools = body.active_tools()
        if not tools:
            return None
        return cls({t.function.name for t in tools}, body.forced_tools() is not None, body.parallel_tool_calls)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        content, calls = parse_tool_calls(text, self.names)
        return content, (calls if self.parallel else calls[:1])


async def _respond(sm: ServedModel, request: Request, body: Any, prompt_ids: list[int], max_tokens: int,
                   chat: bool, constraint: TokenConstraint | None = None) -> Any:  # fmt: skip
    request_id = request_id_of(request.scope)
    stream = sm.runtime.submit(prompt_ids, max_tokens=max_tokens, sampling=_sampling(body, constraint),
                               stops=body.stops(), name=request_id)  # fmt: skip
    tools = _ToolMode.of(body) if chat else None
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
    base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": sm.model_id}  # fmt: skip
    if body.stream:
        gen = _stream_chunks(sm, stream, chat, base, body.include_usage(), tools)
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS)
    deltas, fin = await _collect(stream, request)
    text = "".join(d.text for d in deltas)
    lp = None if body.logprobs_count() is None else _logprobs(sm.pieces, deltas, chat)
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        reason = _finish_reason(fin)
        content, calls = tools.parse(text) if tools is not None else (text, [])
        if calls:
            message = {"role": "assistant", "content": content, "tool_calls": [c.openai() for c in calls]}
            reason = "tool_calls"
        choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": _finish_reason(fin)}
        obj = "text_completion"
    return JSONResponse({**base, "object": obj, "choices": [choice], "usage": _usage(fin)})


def openai_router(models: ServedModels) -> APIRouter:
    """The ``/v1`` routes; a request's ``model`` picks the served model (and so its pipeline)."""
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [sm.card() for sm in models.by_id.values()]}

    @router.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        return models.get(model_id).card()

    def prepare_completion(raw: bytes) -> tuple[ServedModel, CompletionRequest, list[int], int]:
        body = parse_body(raw, CompletionRequest)
        sm = models.get(body.model)
        sm.runtime.check_ready()
        ids = _completion_prompt(sm, body)
        return sm, body, ids, _max_tokens(sm, body, len(ids), COMPLETIONS_DEFAULT_MAX_TOKENS, "max_tokens", "prompt")

    def prepare_chat(raw: bytes) -> tuple[ServedModel, ChatCompletionRequest, list[int], int, TokenConstraint | None]:
        body = parse_body(raw, ChatCompletionRequest)
        sm = models.get(body.model)
        sm.runtime.check_ready()
        constraint = _constraint(sm, body)
        ids = _chat_prompt(sm, body)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        n = _max_tokens(sm, body, len(ids), None, param, "messages")
        if constraint is not None:
            constraint.check_room(n, param, requested=body.requested_tokens() is not None)
        return sm, body, ids, n, constraint

    @router.api_route("/responses", methods=["GET", "POST", "DELETE"])
    @router.api_route("/responses/{rest:path}", methods=["GET", "POST", "DELETE"])
    async def responses() -> Any:
        raise ApiError(404, "/v1/responses: the Responses API is not served by noodle; use POST /v1/chat/completions "
                       "(or /v1/completions)", type="not_found_error", code="unsupported_endpoint")  # fmt: skip

    @router.post("/completions")
    async def completions(request: Request) -> Any:
        sm, body, ids, n = await asyncio.to_thread(prepare_completion, await request.body())  # JSON, tokenizer: off the loop
        return await _respond(sm, request, body, ids, n, chat=False)

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        sm, body, ids, n, constraint = await asyncio.to_thread(prepare_chat, await request.body())
        return await _respond(sm, request, body, ids, n, chat=True, constraint=constraint)

    return router
