"""The dashboard's source in attach mode: `/v1/events` over SSE and the chat through `/v1/chat/completions`.

Both come out in the shapes the in-process source gives (bus dicts, engine events), so the
views cannot tell the two apart; connection changes arrive as "connection" events.
"""

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator

import httpx

from mlx_tui.engine.bus import BreakerChange, TranscriptStep, WorkerChange, decode
from mlx_tui.engine.events import (
    Done,
    Error,
    ErrorKind,
    Event,
    ReasoningDelta,
    StopReason,
    TextDelta,
    Timings,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from mlx_tui.engine.request import GenerationRequest

from .state import ConnectionChange, DashboardEvent, Info

RETRY_S = (1, 2, 5)
WORKER_STATES = {
    "ok": "ready",
    "loading": "loading",
    "restarting": "restarting",
    "stopping": "stopping",
}  # "degraded" says too little
STOP_REASONS: dict[str, StopReason] = {"stop": "end", "length": "length", "tool_calls": "tool_calls"}
ERROR_KINDS: dict[int, ErrorKind] = {
    400: "invalid_request",
    413: "invalid_request",
    429: "overloaded",
    529: "overloaded",
}
# an error event's OpenAI type, back to the engine's kind
ERROR_TYPES: dict[str, ErrorKind] = {
    "invalid_request_error": "invalid_request",
    "request_too_large": "invalid_request",
    "rate_limit_error": "overloaded",
    "service_unavailable": "engine",
    "server_error": "internal",
    "timeout": "timeout",
}


class Refused(Exception):
    """The server answered, but not with what was asked for."""


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The data of each server-sent event, its lines joined."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield "\n".join(data)
            data = []


def refusal(response: httpx.Response, body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        message = error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")[:200]
    return f"HTTP {response.status_code}: {message}"


def describe(error: Exception) -> str:
    if isinstance(error, httpx.ConnectError):
        return "connection refused"
    return str(error) or type(error).__name__


class RemoteBackend:
    """Follows a server started elsewhere (`mlx-tui --serve`), reconnecting when it goes away."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.address = url.rstrip("/")
        headers = {"x-api-key": api_key} if api_key else {}
        timeout = httpx.Timeout(10.0, read=None)
        self.client = httpx.AsyncClient(base_url=self.address, headers=headers, timeout=timeout)
        self._last_seen = 0.0

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        await self.client.aclose()

    async def events(self) -> AsyncIterator[DashboardEvent]:
        yield Info(values={"address": self.address})
        failures = 0
        while True:
            try:
                async for event in self._follow():
                    failures = 0
                    yield event
                reason = "the server closed the event stream"
            except (httpx.HTTPError, Refused, ValueError, KeyError, TypeError) as e:
                reason = describe(e)
            delay = RETRY_S[min(failures, len(RETRY_S) - 1)]
            failures += 1
            yield ConnectionChange(state="unreachable", error=reason, retry_s=delay)
            await asyncio.sleep(delay)

    async def _follow(self) -> AsyncIterator[DashboardEvent]:
        """One connection: the server's state, its known transcripts, then its events as they come."""
        health = await self._get("/health")
        summaries = (await self._get("/v1/transcripts"))["data"]
        async with self.client.stream("GET", "/v1/events") as response:
            if response.status_code != 200:
                raise Refused(refusal(response, await response.aread()))
            now = time.time()
            yield ConnectionChange(state="connected", time=now)
            info = {name: health.get(name) for name in ("model", "blas", "dtype", "tool_parser")}
            if "uptime_s" in health:
                info["started_at"] = now - health["uptime_s"]
            yield Info(values=info, time=now)
            if state := WORKER_STATES.get(health.get("status", "")):
                worker = health.get("worker") or {}
                yield WorkerChange(state=state, time=now, pid=worker.get("pid"), restarts=worker.get("restarts"))
            if breaker := health.get("breaker"):
                yield BreakerChange(
                    state=breaker["state"],
                    time=now,
                    failures=breaker.get("failures"),
                    next_probe_s=breaker.get("next_probe_s"),
                )
            for summary in summaries:
                yield TranscriptStep(id=summary["id"], step="finish", summary=summary, time=now)
            async for data in sse_data(response):
                event = decode(json.loads(data))
                if event.time <= self._last_seen:
                    continue  # replayed after a reconnect: already applied
                self._last_seen = event.time
                yield event

    async def _get(self, path: str) -> dict:
        response = await self.client.get(path)
        if response.status_code != 200:
            raise Refused(refusal(response, response.content))
        return response.json()

    async def transcript(self, id: str) -> dict | None:
        try:
            return await self._get(f"/v1/transcripts/{id}")
        except (httpx.HTTPError, Refused, ValueError):
            return None

    async def chat(self, request: GenerationRequest) -> AsyncGenerator[Event, None]:
        """The reply streamed by `/v1/chat/completions`, as engine events."""
        started = time.monotonic()
        first = None
        try:
            headers = {"user-agent": request.client}
            async with self.client.stream(
                "POST", "/v1/chat/completions", json=chat_body(request), headers=headers
            ) as response:
                if response.status_code != 200:
                    message = refusal(response, await response.aread())
                    yield Error(ERROR_KINDS.get(response.status_code, "engine"), message)
                    return
                reply = ChunkReader()
                async for data in sse_data(response):
                    if data == "[DONE]":
                        break
                    for event in reply.read(json.loads(data)):
                        first = first or time.monotonic()
                        yield event
        except httpx.HTTPError as e:
            yield Error("engine", describe(e))
            return
        if reply.error:
            yield reply.error
            return
        for event in reply.ends():
            yield event
        first = first or time.monotonic()
        yield Done(reply.stop_reason, reply.usage, Timings(0.0, first - started, time.monotonic() - first))


def chat_body(request: GenerationRequest) -> dict:
    messages = []
    for message in request.messages:
        if "tool_calls" in message:
            calls = [
                {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                for c in message["tool_calls"]
            ]
            message = {**message, "tool_calls": calls}
        messages.append(message)
    body = {
        "model": "mlx-tui",
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": request.sampling.temperature,
    }
    if request.tools:
        body["tools"] = request.tools
    return body


class ChunkReader:
    """Turns OpenAI chat-completion chunks back into engine events."""

    def __init__(self) -> None:
        self.calls: dict[int, dict] = {}
        self.stop_reason: StopReason = "end"
        self.usage = Usage(0, 0, 0)
        self.error: Error | None = None

    def read(self, chunk: dict) -> list[Event]:
        if "error" in chunk:
            error = chunk["error"]
            self.error = Error(ERROR_TYPES.get(error.get("type"), "engine"), error.get("message", ""))
            return []
        if used := chunk.get("usage"):
            cached = (used.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            self.usage = Usage(used["prompt_tokens"], cached, used["completion_tokens"])
        events: list[Event] = []
        for choice in chunk.get("choices", []):
            delta = choice.get("delta") or {}
            if text := delta.get("reasoning_content"):
                events.append(ReasoningDelta(text))
            if text := delta.get("content"):
                events.append(TextDelta(text))
            for call in delta.get("tool_calls") or []:
                events.extend(self._call(call))
            if reason := choice.get("finish_reason"):
                self.stop_reason = STOP_REASONS.get(reason, "end")
        return events

    def _call(self, piece: dict) -> list[Event]:
        index, function = piece["index"], piece.get("function") or {}
        events: list[Event] = []
        if index not in self.calls:
            self.calls[index] = {"id": piece.get("id", ""), "name": function.get("name", ""), "arguments": ""}
            events.append(ToolCallStart(index, self.calls[index]["id"], self.calls[index]["name"]))
        if text := function.get("arguments"):
            self.calls[index]["arguments"] += text
            events.append(ToolCallDelta(index, text))
        return events

    def ends(self) -> list[ToolCallEnd]:
        return [
            ToolCallEnd(i, c["id"], c["name"], json.loads(c["arguments"] or "{}"), c["arguments"])
            for i, c in sorted(self.calls.items())
        ]
