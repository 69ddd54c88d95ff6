"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API on the engine."""

import base64
import hashlib
import hmac
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlx_tui.engine import events as ev
from mlx_tui.engine.request import Constraint, GenerationRequest, Sampling

from . import serving, structured
from .anthropic_models import (
    Block,
    DocumentBlock,
    Message,
    MessagesRequest,
    ResultBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from .errors import KIND_STATUS, ApiError, anthropic_error

# Claude Code's first system block carries a value that changes on every request; left in,
# it would start the prompt and defeat the prefix cache. It means nothing to a local model.
BILLING_HEADER = "x-anthropic-billing-header:"
SIGNING_KEY = secrets.token_bytes(32)
STOP_REASONS = {"end": "end_turn", "length": "max_tokens", "stop_sequence": "stop_sequence", "tool_calls": "tool_use"}
PING_SECONDS = 10

Frame = tuple[str, dict]


def sign(thinking: str) -> str:
    """A signature for reasoning this server process produced, checked when it comes back."""
    digest = hmac.new(SIGNING_KEY, thinking.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def signed(thinking: str, signature: str) -> bool:
    # bytes: compare_digest refuses str with characters outside ASCII
    return hmac.compare_digest(sign(thinking).encode(), signature.encode())


# Request: Anthropic → the engine's chat-template shape.


def to_request(body: MessagesRequest, client: str = "") -> GenerationRequest:
    messages = []
    if system := system_text(body.system):
        messages.append({"role": "system", "content": system})
    tool_names: dict[str, str] = {}
    for message in body.messages:
        messages += convert(message, tool_names)
    tools = [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.input_schema}}
        for t in body.tools or []
        if t.input_schema is not None
    ]
    sampling = Sampling(temperature=body.temperature or 0.0, top_p=body.top_p or 0.0, top_k=body.top_k or 0)
    return GenerationRequest(
        messages=messages,
        tools=tools or None,
        tool_choice=tool_choice(body),
        sampling=sampling,
        max_tokens=body.max_tokens,
        stop=body.stop_sequences or [],
        enable_thinking=body.thinking is not None and body.thinking.type != "disabled",
        source="anthropic",
        client=client,
        constraint=constraint(body),
        parallel_tool_calls=not (body.tool_choice and body.tool_choice.disable_parallel_tool_use),
    )


def constraint(body: MessagesRequest) -> Constraint | None:
    """`output_config.format` (or the beta's `output_format`) and tools marked `strict`."""
    strict = [t.name for t in body.tools or [] if t.strict and t.input_schema is not None]
    fmt, field = body.output_format, "output_format"
    if body.output_config and body.output_config.format:
        fmt, field = body.output_config.format, "output_config.format"
    return structured.constraint(fmt.type if fmt else None, fmt.schema_ if fmt else None, strict, f"{field}.schema")


def system_text(system: str | list[TextBlock] | None) -> str:
    if not isinstance(system, list):
        return system or ""
    return "\n".join(b.text for b in system if not b.text.startswith(BILLING_HEADER))


def tool_choice(body: MessagesRequest) -> str:
    choice = body.tool_choice
    if choice is None or choice.type == "auto":
        return "auto"
    if choice.type == "any":
        return "required"
    if choice.type == "none":
        return "none"
    if not choice.name:
        raise ApiError(400, "tool_choice: a choice of type 'tool' needs the tool's name")
    return choice.name


def convert(message: Message, tool_names: dict[str, str]) -> list[dict]:
    """One Anthropic message as chat-template messages (tool results become tool messages)."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    if message.role == "assistant":
        return [assistant_message(message, tool_names)]
    out: list[dict] = []
    texts: list[str] = []
    for block in message.content:
        if isinstance(block, ToolResultBlock):
            if texts:
                out.append({"role": message.role, "content": "\n".join(texts)})
                texts = []
            out.append(tool_message(block, tool_names))
        else:
            texts.append(block_text(block))
    if texts or not out:
        out.append({"role": message.role, "content": "\n".join(texts)})
    return out


def assistant_message(message: Message, tool_names: dict[str, str]) -> dict:
    assert not isinstance(message.content, str)  # convert() takes a string itself
    texts, reasoning, calls = [], [], []
    for block in message.content:
        if isinstance(block, ThinkingBlock):
            if signed(block.thinking, block.signature):
                reasoning.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            tool_names[block.id] = block.name
            calls.append(
                {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": block.input}}
            )
        elif block.type != "redacted_thinking":
            texts.append(block_text(block))
    out: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    if reasoning:
        out["reasoning_content"] = "\n".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return out


def tool_message(block: ToolResultBlock, tool_names: dict[str, str]) -> dict:
    content = block.content if isinstance(block.content, str) else "\n".join(map(block_text, block.content))
    if block.is_error:
        content = f"Error: {content}"
    out = {"role": "tool", "tool_call_id": block.tool_use_id, "content": content}
    if name := tool_names.get(block.tool_use_id):
        out["name"] = name
    return out


def block_text(block: Block | ResultBlock) -> str:
    """A block as prompt text: text as is, anything a text-only model cannot read as a placeholder."""
    if isinstance(block, TextBlock):
        return block.text
    if isinstance(block, DocumentBlock) and block.title:
        return f"[document {block.title!r}: not shown, this model reads text only]"
    return f"[{block.type}: not shown, this model reads text only]"


# Response: engine events → Anthropic stream frames (and, folded, the whole message).


class MessageStream:
    """One request's engine events as Anthropic SSE frames: (event name, data)."""

    def __init__(self, model: str, thinking: bool) -> None:
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.model = model
        self.thinking = thinking
        self.index = -1
        self.block: str | None = None
        self.reasoning: list[str] = []

    def start(self, started: ev.Started) -> list[Frame]:
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage(started.prompt_tokens, started.cached_tokens, 0),
        }
        return [("message_start", {"type": "message_start", "message": message})]

    def feed(self, event: ev.Event) -> list[Frame]:
        match event:
            case ev.TextDelta(text):
                return self.open("text", {"type": "text", "text": ""}) + self.delta(
                    {"type": "text_delta", "text": text}
                )
            case ev.ReasoningDelta(text) if self.thinking:
                self.reasoning.append(text)
                block: dict[str, Any] = {"type": "thinking", "thinking": "", "signature": ""}
                return self.open("thinking", block) + self.delta({"type": "thinking_delta", "thinking": text})
            case ev.ToolCallStart(_, call_id, name):
                block = {"type": "tool_use", "id": f"toolu_{call_id}", "name": name, "input": {}}
                return self.close() + self.open("tool_use", block)
            case ev.ToolCallDelta(_, text):
                return self.delta({"type": "input_json_delta", "partial_json": text})
            case ev.ToolCallEnd():
                return self.close()
            case ev.ToolCallAbandoned(_, _, completion):
                closing = self.delta({"type": "input_json_delta", "partial_json": completion}) if completion else []
                return closing + self.close()
            case ev.Done(reason, used, _, stop_sequence):
                delta = {"stop_reason": STOP_REASONS[reason], "stop_sequence": stop_sequence}
                data = {"type": "message_delta", "delta": delta, "usage": usage(*astuple(used))}
                return self.close() + [("message_delta", data), ("message_stop", {"type": "message_stop"})]
            case ev.Error(kind, message):
                return [("error", anthropic_error(KIND_STATUS.get(kind, 500), message))]
        return []

    def open(self, kind: str, block: dict) -> list[Frame]:
        """Start a block of `kind` unless one is open already."""
        if self.block == kind:
            return []
        frames = self.close()
        self.index += 1
        self.block = kind
        return frames + [
            ("content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block})
        ]

    def delta(self, delta: dict) -> list[Frame]:
        return [("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})]

    def close(self) -> list[Frame]:
        if self.block is None:
            return []
        frames = []
        if self.block == "thinking":
            frames = self.delta({"type": "signature_delta", "signature": sign("".join(self.reasoning))})
            self.reasoning = []
        self.block = None
        return frames + [("content_block_stop", {"type": "content_block_stop", "index": self.index})]


def usage(prompt: int, cached: int, generated: int) -> dict:
    """Anthropic's arithmetic: input (uncached) + cache reads + cache creation = the prompt."""
    return {
        "input_tokens": prompt - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": generated,
    }


def astuple(used: ev.Usage) -> tuple[int, int, int]:
    return used.prompt_tokens, used.cached_tokens, used.generated_tokens


def fold(frames: Iterable[Frame]) -> dict:
    """The whole message the frames describe, as a non-streaming response."""
    message: dict = {}
    arguments: dict[int, str] = {}
    for name, data in frames:
        if name == "message_start":
            message = data["message"]
        elif name == "content_block_start":
            message["content"].append(dict(data["content_block"]))
        elif name == "content_block_delta":
            block, delta = message["content"][data["index"]], data["delta"]
            if delta["type"] == "input_json_delta":
                arguments[data["index"]] = arguments.get(data["index"], "") + delta["partial_json"]
            else:
                field = delta["type"].removesuffix("_delta")
                block[field] = block[field] + delta[field] if field != "signature" else delta[field]
        elif name == "content_block_stop" and data["index"] in arguments:
            message["content"][data["index"]]["input"] = json.loads(arguments[data["index"]])
        elif name == "message_delta":
            message.update(data["delta"], usage=data["usage"])
    return message


# Routes.


async def messages(request: Request) -> Response:
    body, received = await serving.parse(request, MessagesRequest)
    engine_request = to_request(body, request.headers.get("user-agent", ""))
    stream = MessageStream(body.model, engine_request.enable_thinking)
    exchange = serving.Exchange(request, engine_request, stream.id, received)
    if not body.stream:
        return await serving.unless_disconnected(request, exchange.respond(stream, fold))
    started = await exchange.start()
    return EventSourceResponse(
        sse(exchange, stream, started),
        ping=PING_SECONDS,
        ping_message_factory=lambda: ServerSentEvent(json.dumps({"type": "ping"}), event="ping"),
        sep="\n",
    )


async def sse(exchange: serving.Exchange, stream: MessageStream, started: ev.Started) -> AsyncIterator[bytes]:
    try:
        async with aclosing(exchange.frames(stream, started)) as frames:
            async for frame in frames:
                yield encode(exchange, frame)
    finally:
        exchange.finish()


def encode(exchange: serving.Exchange, frame: Frame) -> bytes:
    name, data = frame
    text = serving.dumps(data)
    exchange.sent(text)
    return serving.sse_frame(text, name)


async def count_tokens(request: Request) -> Response:
    body, _ = await serving.parse(request, MessagesRequest)
    count = await serving.count_tokens(serving.engine_of(request), to_request(body))
    return JSONResponse({"input_tokens": count})
