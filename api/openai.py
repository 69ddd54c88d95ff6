"""POST /v1/chat/completions: OpenAI's Chat Completions API on the engine."""

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response

from mlx_tui.engine import events as ev
from mlx_tui.engine.request import Constraint, GenerationRequest, Sampling

from . import serving, structured
from .errors import KIND_STATUS, ApiError, openai_error
from .openai_models import ChatMessage, ChatRequest, Function, Part, TextPart

FINISH_REASONS = {"end": "stop", "length": "length", "stop_sequence": "stop", "tool_calls": "tool_calls"}
PING_SECONDS = 10
EMPTY_SCHEMA = {"type": "object", "properties": {}}


# Request: OpenAI → the engine's chat-template shape.


def to_request(body: ChatRequest, client: str = "") -> GenerationRequest:
    refuse_unsupported(body)
    tools = [{"type": "function", "function": function(t.function)} for t in body.tools or []]
    return GenerationRequest(
        messages=[convert(i, m) for i, m in enumerate(body.messages)],
        tools=tools or None,
        tool_choice=tool_choice(body),
        sampling=sampling(body),
        max_tokens=body.max_completion_tokens or body.max_tokens,
        stop=[body.stop] if isinstance(body.stop, str) else body.stop or [],
        enable_thinking=enable_thinking(body),
        source="openai",
        client=client,
        constraint=constraint(body),
        parallel_tool_calls=body.parallel_tool_calls is not False,
    )


def constraint(body: ChatRequest) -> Constraint | None:
    """`response_format` and tools marked `strict`; `strict: false` in a json_schema is bound all the same."""
    strict = [t.function.name for t in body.tools or [] if t.function.strict]
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
        raise ApiError(400, "response_format.json_schema: a json_schema format needs json_schema.schema")
    schema = fmt.json_schema.schema_ if fmt is not None and fmt.json_schema else None
    return structured.constraint(fmt.type if fmt else None, schema, strict, "response_format.json_schema.schema")


def function(f: Function) -> dict:
    """A function schema in the usual key order (templates render it as JSON), with parameters always present."""
    return (
        {"name": f.name}
        | ({"description": f.description} if f.description else {})
        | {"parameters": f.parameters or EMPTY_SCHEMA}
    )


def refuse_unsupported(body: ChatRequest) -> None:
    """400 for what a local text model cannot do as asked, rather than silently doing something else."""
    problems = {
        "n": body.n > 1 and "only one choice (n=1) is generated",
        "logprobs": body.logprobs and "log probabilities are not available",
        "audio": body.audio is not None and "audio output is not supported",
        "web_search_options": body.web_search_options is not None and "web search is not available",
        "functions": (body.functions is not None or body.function_call is not None)
        and "functions and function_call are not supported; use tools and tool_choice",
    }
    for name, problem in problems.items():
        if problem:
            raise ApiError(400, f"{name}: {problem}")


def convert(i: int, message: ChatMessage) -> dict:
    role = "system" if message.role == "developer" else message.role
    if message.content is None and role != "assistant":
        raise ApiError(400, f"messages.{i}.content: a {message.role} message needs content")
    out: dict[str, Any] = {"role": role, "content": text(message.content)}
    if role == "tool":
        if message.tool_call_id is None:
            raise ApiError(400, f"messages.{i}.tool_call_id: a tool message needs the id of the call it answers")
        out["tool_call_id"] = message.tool_call_id
    if role == "assistant":
        if message.reasoning_content:
            out["reasoning_content"] = message.reasoning_content
        if message.tool_calls:
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": arguments(i, c.function.arguments)},
                }
                for c in message.tool_calls
            ]
    return out


def text(content: str | list[Part] | None) -> str:
    """Content as prompt text; parts a text-only model cannot read become a placeholder."""
    if not isinstance(content, list):
        return content or ""
    return "\n".join(
        p.text if isinstance(p, TextPart) else f"[{p.type}: not shown, this model reads text only]" for p in content
    )


def arguments(i: int, raw: str) -> dict:
    try:
        parsed = json.loads(raw or "{}")
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ApiError(400, f"messages.{i}.tool_calls: arguments must be a JSON object, got {raw[:100]!r}")
    return parsed


def tool_choice(body: ChatRequest) -> str:
    choice = body.tool_choice
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else choice.function.name


def sampling(body: ChatRequest) -> Sampling:
    try:
        logit_bias = {int(token): bias for token, bias in (body.logit_bias or {}).items()}
    except ValueError:
        raise ApiError(400, "logit_bias: the keys must be token ids") from None
    return Sampling(
        temperature=body.temperature or 0.0,
        top_p=body.top_p or 0.0,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=logit_bias or None,
        seed=None if body.seed is None else body.seed % 2**64,
    )


def enable_thinking(body: ChatRequest) -> bool | None:
    """vLLM's `chat_template_kwargs.enable_thinking`, else `reasoning_effort` ("none" is off), else the template's
    default."""
    if body.chat_template_kwargs and body.chat_template_kwargs.enable_thinking is not None:
        return body.chat_template_kwargs.enable_thinking
    if body.reasoning_effort is not None:
        return body.reasoning_effort != "none"
    return None


# Response: engine events → chunks (and, folded, the whole completion).


class ChunkStream:
    """One request's engine events as Chat Completions chunks (or an error object)."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def start(self, started: ev.Started) -> list[dict]:
        return [self.chunk({"role": "assistant", "content": ""})]

    def feed(self, event: ev.Event) -> list[dict]:
        match event:
            case ev.TextDelta(text):
                return [self.chunk({"content": text})]
            case ev.ReasoningDelta(text):
                return [self.chunk({"reasoning_content": text})]
            case ev.ToolCallStart(index, call_id, name):
                call = {
                    "index": index,
                    "id": f"call_{call_id}",
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
                return [self.chunk({"tool_calls": [call]})]
            case ev.ToolCallDelta(index, text) | ev.ToolCallAbandoned(index, _, text) if text:
                return [self.chunk({"tool_calls": [{"index": index, "function": {"arguments": text}}]})]
            case ev.Done(reason, used):
                chunks = [self.chunk({}, FINISH_REASONS[reason])]
                if self.include_usage:
                    chunks.append({**self.chunk({}), "choices": [], "usage": usage(used)})
                return chunks
            case ev.Error(kind, message):
                return [openai_error(KIND_STATUS.get(kind, 500), message)]
        return []

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk


def usage(used: ev.Usage) -> dict:
    """OpenAI's arithmetic: prompt_tokens counts the whole prompt, cached tokens included."""
    return {
        "prompt_tokens": used.prompt_tokens,
        "completion_tokens": used.generated_tokens,
        "total_tokens": used.prompt_tokens + used.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": used.cached_tokens},
    }


def fold(stream: ChunkStream, chunks: Iterable[dict]) -> dict:
    """The whole completion the chunks describe, as a non-streaming response."""
    message: dict[str, Any] = {"role": "assistant", "content": None}
    calls: dict[int, dict] = {}
    finish_reason = used = None
    for chunk in chunks:
        used = chunk.get("usage") or used
        for choice in chunk["choices"]:
            delta = choice["delta"]
            for field in ("content", "reasoning_content"):
                if delta.get(field):
                    message[field] = (message.get(field) or "") + delta[field]
            for call in delta.get("tool_calls", []):
                if "id" in call:
                    calls[call["index"]] = call | {"function": dict(call["function"])}
                else:
                    calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
            finish_reason = choice["finish_reason"] or finish_reason
    if calls:
        message["tool_calls"] = [{k: v for k, v in calls[i].items() if k != "index"} for i in sorted(calls)]
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    return {
        "id": stream.id,
        "object": "chat.completion",
        "created": stream.created,
        "model": stream.model,
        "choices": [choice],
        "usage": used,
    }


# Route.


async def chat_completions(request: Request) -> Response:
    body, received = await serving.parse(request, ChatRequest)
    engine_request = to_request(body, request.headers.get("user-agent", ""))
    include_usage = not body.stream or bool(body.stream_options and body.stream_options.include_usage)
    stream = ChunkStream(body.model, include_usage)
    exchange = serving.Exchange(request, engine_request, stream.id, received)
    if not body.stream:
        return await serving.unless_disconnected(request, exchange.respond(stream, lambda frames: fold(stream, frames)))
    started = await exchange.start()
    return EventSourceResponse(sse(exchange, stream, started), ping=PING_SECONDS, sep="\n")


async def sse(exchange: serving.Exchange, stream: ChunkStream, started: ev.Started) -> AsyncIterator[bytes]:
    try:
        async with aclosing(exchange.frames(stream, started)) as chunks:
            async for chunk in chunks:
                yield encode(exchange, chunk)
        yield serving.sse_frame("[DONE]")
    finally:
        exchange.finish()


def encode(exchange: serving.Exchange, chunk: dict) -> bytes:
    text = serving.dumps(chunk)
    exchange.sent(text)
    return serving.sse_frame(text)
