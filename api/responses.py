"""POST /v1/responses: OpenAI's Responses API (what Codex CLI speaks) on the engine.

Nothing is stored: each request carries its whole conversation, as Codex sends it with
`store: false`. Reasoning goes back and forth in `encrypted_content`, which here is the
reasoning text with a signature of this server process (like Anthropic's `thinking`),
signed rather than secret.
"""

import base64
import copy
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response

from mlx_tui.engine import events as ev
from mlx_tui.engine.request import Constraint, GenerationRequest, Sampling

from . import serving, structured
from .anthropic import sign, signed
from .errors import KIND_STATUS, ApiError, openai_error, openai_status
from .responses_models import (
    CustomTool,
    CustomToolCall,
    FunctionCall,
    FunctionCallOutput,
    FunctionTool,
    ItemReference,
    Message,
    NamespaceTool,
    Part,
    Reasoning,
    RefusalPart,
    ResponsesRequest,
    TextPart,
)

PING_SECONDS = 10
# A client's idle timer counts events, not SSE comments (Codex gives up after 300 s without one):
# during a long prefill, `response.in_progress` is sent again at most this often.
PROGRESS_SECONDS = 30
EMPTY_SCHEMA = {"type": "object", "properties": {}}
CUSTOM_SCHEMA = {
    "type": "object",
    "properties": {"input": {"type": "string", "description": "The tool's input, as free text."}},
    "required": ["input"],
}
ERROR_CODES = {429: "rate_limit_exceeded"}

Frame = dict


@dataclass(slots=True, frozen=True)
class Target:
    """What a tool name offered to the model stands for: a function or custom tool, maybe inside a namespace."""

    name: str
    namespace: str | None = None
    custom: bool = False
    strict: bool = False


# Request: Responses → the engine's chat-template shape.


def to_request(body: ResponsesRequest, client: str = "") -> tuple[GenerationRequest, dict[str, Target]]:
    """The engine request, and what each tool name offered to the model stands for."""
    refuse_unsupported(body)
    tools, targets = offer(body.tools or [])
    request = GenerationRequest(
        messages=convert(body, {(t.namespace, t.name): name for name, t in targets.items()}),
        tools=tools or None,
        tool_choice=tool_choice(body, targets),
        sampling=Sampling(temperature=body.temperature or 0.0, top_p=body.top_p or 0.0),
        max_tokens=body.max_output_tokens,
        enable_thinking=enable_thinking(body),
        source="responses",
        client=client,
        constraint=constraint(body, targets),
        parallel_tool_calls=body.parallel_tool_calls is not False,
    )
    return request, targets


def constraint(body: ResponsesRequest, targets: dict[str, Target]) -> Constraint | None:
    """`text.format` and function tools marked `strict` (absent means not strict here: binding costs, so it is asked
    for)."""
    fmt = body.text and body.text.format
    strict = [name for name, target in targets.items() if target.strict]
    return structured.constraint(fmt.type if fmt else None, fmt.schema_ if fmt else None, strict, "text.format.schema")


def enable_thinking(body: ResponsesRequest) -> bool | None:
    """`reasoning.effort` "none" turns thinking off, any other effort on; without one, the template's default."""
    effort = body.reasoning and body.reasoning.effort
    return None if effort is None else effort != "none"


def refuse_unsupported(body: ResponsesRequest) -> None:
    """400 for what needs responses kept on the server, or output this route cannot shape yet."""
    kept = "this server does not keep responses; send the whole conversation in input (as with store: false)"
    problems = {
        "previous_response_id": body.previous_response_id is not None and kept,
        "conversation": body.conversation is not None and kept,
        "background": body.background and "background responses are not supported; stream instead",
    }
    for name, problem in problems.items():
        if problem:
            raise ApiError(400, f"{name}: {problem}")


def offer(tools: list) -> tuple[list[dict], dict[str, Target]]:
    """Function schemas for the model; a namespace's tools under their own names unless taken, else `namespace__name`.

    Hosted tools (web_search, file_search, ...) are left out: nothing here can run them.
    """
    entries: list[tuple[FunctionTool | CustomTool, str | None]] = []
    for tool in tools:
        if isinstance(tool, NamespaceTool):
            entries += [(inner, tool.name) for inner in tool.tools if isinstance(inner, FunctionTool | CustomTool)]
        elif isinstance(tool, FunctionTool | CustomTool):
            entries.append((tool, None))
    taken = {tool.name for tool, namespace in entries if namespace is None}
    schemas, targets = [], {}
    for tool, namespace in entries:
        name = tool.name if namespace is None or tool.name not in taken else f"{namespace}__{tool.name}"
        taken.add(name)
        custom = isinstance(tool, CustomTool)
        strict = isinstance(tool, FunctionTool) and bool(tool.strict)  # not custom
        targets[name] = Target(tool.name, namespace, custom, strict)
        parameters = CUSTOM_SCHEMA if isinstance(tool, CustomTool) else tool.parameters or EMPTY_SCHEMA
        schema = (
            {"name": name}
            | ({"description": tool.description} if tool.description else {})
            | {"parameters": parameters}
        )
        schemas.append({"type": "function", "function": schema})
    return schemas, targets


def tool_choice(body: ResponsesRequest, targets: dict[str, Target]) -> str:
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    if choice.type not in ("function", "custom") or not choice.name:
        raise ApiError(
            400, f"tool_choice: only auto, none, required or a named function can be chosen here, not {choice.type!r}"
        )
    for name, target in targets.items():
        if (
            target.name == choice.name
            and choice.namespace in (None, target.namespace)
            and target.custom == (choice.type == "custom")
        ):
            return name
    raise ApiError(400, f"tool_choice names {choice.name!r}, which is not among the tools")


def convert(body: ResponsesRequest, names: dict[tuple[str | None, str], str]) -> list[dict]:
    """The input items as chat-template messages; the instructions and leading system turns become one system
    message."""
    items = [Message(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    system = [body.instructions] if body.instructions else []
    messages: list[dict] = []
    called: dict[str, str] = {}  # call id → the name the model knows the tool by
    turn: dict | None = None  # the assistant message being gathered from consecutive items
    for i, item in enumerate(items):
        if isinstance(item, ItemReference):
            raise ApiError(
                400,
                f"input.{i}: item references need stored responses, which this server does not keep; send the items",
            )
        if isinstance(item, Message) and item.role != "assistant":
            role = "user" if item.role == "user" else "system"
            if role == "system" and not messages:
                system.append(text(item.content))
            else:
                messages.append({"role": role, "content": text(item.content)})
            turn = None
        elif isinstance(item, FunctionCallOutput):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": text(item.output)})
            if name := called.get(item.call_id):
                messages[-1]["name"] = name
            turn = None
        elif isinstance(item, Reasoning):
            if (reasoning := unseal(item.encrypted_content)) is None:
                continue
            if turn is None or turn["content"] or turn.get("tool_calls"):
                turn = {"role": "assistant", "content": ""}
                messages.append(turn)
            turn["reasoning_content"] = "\n".join(filter(None, [turn.get("reasoning_content"), reasoning]))
        elif isinstance(item, Message | FunctionCall | CustomToolCall):
            if turn is None or (isinstance(item, Message) and turn.get("tool_calls")):
                turn = {"role": "assistant", "content": ""}
                messages.append(turn)
            if isinstance(item, Message):
                turn["content"] = "\n".join(filter(None, [turn["content"], text(item.content)]))
            else:
                call = history_call(i, item, names)
                called[item.call_id] = call["function"]["name"]
                turn.setdefault("tool_calls", []).append(call)
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return messages


def history_call(i: int, item: FunctionCall | CustomToolCall, names: dict[tuple[str | None, str], str]) -> dict:
    """A call from the conversation, under the name its tool was offered to the model."""
    name = names.get((item.namespace, item.name)) or names.get((None, item.name)) or item.name
    if isinstance(item, CustomToolCall):
        arguments = {"input": item.input}
    else:
        try:
            arguments = json.loads(item.arguments or "{}")
        except (ValueError, RecursionError):
            arguments = None
        if not isinstance(arguments, dict):
            raise ApiError(400, f"input.{i}.arguments: must be a JSON object, got {item.arguments[:100]!r}")
    return {"id": item.call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def text(content: str | list[Part]) -> str:
    """Content as prompt text; parts a text-only model cannot read become a placeholder."""
    if isinstance(content, str):
        return content
    return "\n".join(map(part_text, content))


def part_text(part: Part) -> str:
    if isinstance(part, TextPart):
        return part.text
    if isinstance(part, RefusalPart):
        return part.refusal
    return f"[{part.type}: not shown, this model reads text only]"


def seal(reasoning: str) -> str:
    """The reasoning with this process's signature, as `encrypted_content`."""
    return base64.b64encode(reasoning.encode()).decode() + "." + sign(reasoning)


def unseal(sealed: str | None) -> str | None:
    """The reasoning in `encrypted_content` if this server process signed it, else None (it is dropped)."""
    data, _, signature = (sealed or "").partition(".")
    try:
        reasoning = base64.b64decode(data, validate=True).decode()
    except ValueError:
        return None
    return reasoning if signature and signed(reasoning, signature) else None


# Response: engine events → Responses stream events (and, from the last one, the whole response).


class ResponseStream:
    """One request's engine events as Responses API stream events, each with its sequence number."""

    def __init__(self, body: ResponsesRequest, targets: dict[str, Target]) -> None:
        self.id = f"resp_{uuid.uuid4().hex[:24]}"
        self.created_at = int(time.time())
        self.body = body
        self.targets = targets
        self.summary = body.reasoning is not None and bool(body.reasoning.summary or body.reasoning.generate_summary)
        self.parallel = body.parallel_tool_calls is not False
        self.sequence = 0
        self.alive = time.monotonic()  # when the last event was made
        self.output: list[dict] = []
        self.open: dict | None = None  # the message or reasoning item receiving deltas
        self.calls: dict[int, dict] = {}  # the engine's call index → its output item
        self.arguments: dict[int, str] = {}  # the engine's call index → its arguments so far
        self.dropped: set[int] = set()  # calls after the first when parallel_tool_calls is false

    def response(self, status: str, **fields: Any) -> dict:
        body = self.body
        choice = body.tool_choice
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": body.model,
            "output": [snapshot(item) for item in self.output],
            "parallel_tool_calls": self.parallel,
            "tool_choice": choice
            if isinstance(choice, str)
            else choice.model_dump(exclude_none=True)
            if choice
            else "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "reasoning": body.reasoning.model_dump() if body.reasoning else None,
            "text": {"format": {"type": "text"}},
            "store": False,
            "prompt_cache_key": body.prompt_cache_key,
            "error": None,
            "incomplete_details": None,
            "usage": None,
            "metadata": {},
        } | fields

    def event(self, kind: str, **fields: Any) -> Frame:
        self.alive = time.monotonic()
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1} | fields

    def start(self, started: ev.Started) -> list[Frame]:
        return [
            self.event("response.created", response=self.response("in_progress")),
            self.event("response.in_progress", response=self.response("in_progress")),
        ]

    def feed(self, event: ev.Event) -> list[Frame]:
        match event:
            case ev.PrefillProgress() if time.monotonic() - self.alive >= PROGRESS_SECONDS:
                return [self.event("response.in_progress", response=self.response("in_progress"))]
            case ev.TextDelta(delta):
                frames = self.open_item("message")
                assert self.open is not None  # open_item opened it
                self.open["content"][0]["text"] += delta
                return frames + [
                    self.event("response.output_text.delta", **self.where(), content_index=0, delta=delta, logprobs=[])
                ]
            case ev.ReasoningDelta(delta):
                frames = self.open_item("reasoning")
                assert self.open is not None  # open_item opened it
                self.open["content"][0]["text"] += delta
                frames.append(self.event("response.reasoning_text.delta", **self.where(), content_index=0, delta=delta))
                if self.summary:
                    self.open["summary"][0]["text"] += delta
                    frames.append(
                        self.event(
                            "response.reasoning_summary_text.delta", **self.where(), summary_index=0, delta=delta
                        )
                    )
                return frames
            case ev.ToolCallStart(index, call_id, name):
                return self.close() + self.start_call(index, call_id, name)
            case ev.ToolCallDelta(index, delta) if index in self.calls:
                return self.call_delta(index, delta)
            case ev.ToolCallEnd(index) if index in self.calls:
                return self.end_call(index, "completed")
            case ev.ToolCallAbandoned(index, _, completion) if index in self.calls:
                return (self.call_delta(index, completion) if completion else []) + self.end_call(index, "incomplete")
            case ev.Done(reason, used):
                return self.finish(reason, used)
            case ev.Error(kind, message):
                return self.fail(KIND_STATUS.get(kind, 500), message)
        return []

    def where(self, item: dict | None = None) -> dict:
        item = item or self.open
        assert item is not None  # an item is open when none is given
        return {"item_id": item["id"], "output_index": self.output.index(item)}

    def open_item(self, kind: str) -> list[Frame]:
        """Start an output item of `kind` (message or reasoning) unless one is open already."""
        if self.open is not None and self.open["type"] == kind:
            return []
        frames = self.close()
        item: dict[str, Any]
        part: dict[str, Any]
        if kind == "message":
            item = {
                "id": f"msg_{uuid.uuid4().hex[:24]}",
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            part = {"type": "output_text", "text": "", "annotations": []}
        else:
            item = {"id": f"rs_{uuid.uuid4().hex[:24]}", "type": "reasoning", "summary": [], "content": []}
            part = {"type": "reasoning_text", "text": ""}
        self.output.append(item)
        self.open = item
        frames.append(self.event("response.output_item.added", output_index=len(self.output) - 1, item=snapshot(item)))
        item["content"].append(part)
        frames.append(self.event("response.content_part.added", **self.where(), content_index=0, part=dict(part)))
        if kind == "reasoning" and self.summary:
            item["summary"].append({"type": "summary_text", "text": ""})
            frames.append(
                self.event(
                    "response.reasoning_summary_part.added",
                    **self.where(),
                    summary_index=0,
                    part=dict(item["summary"][0]),
                )
            )
        return frames

    def close(self, status: str = "completed") -> list[Frame]:
        """Finish the open message or reasoning item with its .done events."""
        item, self.open = self.open, None
        if item is None:
            return []
        where = self.where(item)
        part = item["content"][0]
        if item["type"] == "message":
            item["status"] = status
            frames = [self.event("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[])]
        else:
            item["encrypted_content"] = seal(part["text"])
            frames = [self.event("response.reasoning_text.done", **where, content_index=0, text=part["text"])]
        frames.append(self.event("response.content_part.done", **where, content_index=0, part=dict(part)))
        if item["type"] == "reasoning" and item["summary"]:
            summary = item["summary"][0]
            frames.append(
                self.event("response.reasoning_summary_text.done", **where, summary_index=0, text=summary["text"])
            )
            frames.append(
                self.event("response.reasoning_summary_part.done", **where, summary_index=0, part=dict(summary))
            )
        return frames + [
            self.event("response.output_item.done", output_index=where["output_index"], item=snapshot(item))
        ]

    def start_call(self, index: int, call_id: str, name: str) -> list[Frame]:
        if not self.parallel and (self.calls or self.dropped):
            self.dropped.add(index)
            return []
        target = self.targets.get(name) or Target(name)
        item: dict[str, Any] = {
            "id": f"fc_{call_id}",
            "type": "function_call",
            "status": "in_progress",
            "call_id": f"call_{call_id}",
            "name": target.name,
        }
        if target.custom:
            item |= {"id": f"ctc_{call_id}", "type": "custom_tool_call", "input": ""}
        else:
            item["arguments"] = ""
        if target.namespace:
            item["namespace"] = target.namespace
        self.output.append(item)
        self.calls[index] = item
        self.arguments[index] = ""
        return [self.event("response.output_item.added", output_index=len(self.output) - 1, item=snapshot(item))]

    def call_delta(self, index: int, delta: str) -> list[Frame]:
        item = self.calls[index]
        self.arguments[index] += delta
        if item["type"] == "custom_tool_call":
            return []  # its input is known once the arguments are whole
        item["arguments"] += delta
        return [self.event("response.function_call_arguments.delta", **self.where(item), delta=delta)]

    def end_call(self, index: int, status: str) -> list[Frame]:
        item = self.calls[index]
        item["status"] = status
        if item["type"] == "custom_tool_call":
            item["input"] = custom_input(self.arguments[index])
            done = self.event("response.custom_tool_call_input.done", **self.where(item), input=item["input"])
        else:
            done = self.event("response.function_call_arguments.done", **self.where(item), arguments=item["arguments"])
        return [
            done,
            self.event("response.output_item.done", output_index=self.output.index(item), item=snapshot(item)),
        ]

    def finish(self, reason: str, used: ev.Usage) -> list[Frame]:
        cut = reason == "length"
        frames = self.close("incomplete" if cut else "completed")
        if cut:
            response = self.response(
                "incomplete", incomplete_details={"reason": "max_output_tokens"}, usage=usage(used)
            )
            return frames + [self.event("response.incomplete", response=response)]
        return frames + [self.event("response.completed", response=self.response("completed", usage=usage(used)))]

    def fail(self, status: int, message: str) -> list[Frame]:
        """A failure after streaming began: an `error` event, then the response as failed."""
        error = openai_error(status, message)["error"]
        code = error["code"] or ERROR_CODES.get(openai_status(status), "server_error")
        failed = self.response("failed", error={"code": code, "message": message})
        return [
            self.event("error", code=code, message=message, param=None),
            self.event("response.failed", response=failed),
        ]


def snapshot(item: dict) -> dict:
    """An output item as it is at this event (the stream goes on changing its own)."""
    return copy.deepcopy(item)


def custom_input(arguments: str) -> str:
    """A custom tool's free-text input from the arguments the model wrote ({"input": ...}), or the arguments as they
    are."""
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(parsed, dict) and list(parsed) == ["input"] and isinstance(parsed["input"], str):
        return parsed["input"]
    return arguments


def usage(used: ev.Usage) -> dict:
    """OpenAI's arithmetic: input_tokens counts the whole prompt, cached tokens included."""
    return {
        "input_tokens": used.prompt_tokens,
        "input_tokens_details": {"cached_tokens": used.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": used.generated_tokens,
        "output_tokens_details": {"reasoning_tokens": used.reasoning_tokens},
        "total_tokens": used.prompt_tokens + used.generated_tokens,
    }


def final(frames: Iterable[Frame]) -> dict:
    """The whole response: what the last lifecycle event carries."""
    return [f for f in frames if f["type"] in ("response.completed", "response.incomplete", "response.failed")][-1][
        "response"
    ]


# Route.


def client_of(request: Request) -> str:
    """The client as product/version (`codex_exec/0.171.0`): the user agent's first word, else the `originator`
    header."""
    return request.headers.get("user-agent", "").split(" ", 1)[0] or request.headers.get("originator", "")


async def responses(request: Request) -> Response:
    body, received = await serving.parse(request, ResponsesRequest)
    engine_request, targets = to_request(body, client_of(request))
    stream = ResponseStream(body, targets)
    exchange = serving.Exchange(request, engine_request, stream.id, received)
    if not body.stream:
        return await serving.unless_disconnected(request, exchange.respond(stream, final))
    started = await exchange.start()
    return EventSourceResponse(sse(exchange, stream, started), ping=PING_SECONDS, sep="\n")


async def sse(exchange: serving.Exchange, stream: ResponseStream, started: ev.Started) -> AsyncIterator[bytes]:
    try:
        async with aclosing(exchange.frames(stream, started)) as frames:
            async for frame in frames:
                text = serving.dumps(frame)
                exchange.sent(text)
                yield serving.sse_frame(text, frame["type"])
    finally:
        exchange.finish()
