"""The dashboard's source in attach mode: `/v1/events` over SSE and the chat through `/v1/chat/completions`.

Both come out in the shapes the in-process source gives (bus dicts, engine events), so the
views cannot tell the two apart; connection changes arrive as "connection" events.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx

from mlx_tui.engine.events import (
    Done,
    Error,
    Event,
    ReasoningDelta,
    TextDelta,
    Timings,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from mlx_tui.engine.request import Request

RETRY_S = (1, 2, 5)
WORKER_STATES = {"ok": "ready", "loading": "loading", "restarting": "restarting", "stopping": "stopping"}  # "degraded" says too little
STOP_REASONS = {"stop": "end", "length": "length", "tool_calls": "tool_calls"}
ERROR_KINDS = {400: "invalid_request", 413: "invalid_request", 429: "overloaded", 529: "overloaded"}


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

    def __init__(self, url: str, api_key: str | None = None):
        self.address = url.rstrip("/")
        headers = {"x-api-key": api_key} if api_key else {}
        timeout = httpx.Timeout(10.0, read=None)
        self.client = httpx.AsyncClient(base_url=self.address, headers=headers, timeout=timeout)
        self._last_seen = 0.0

    def start(self):
        pass

    async def stop(self):
        await self.client.aclose()

    async def events(self) -> AsyncIterator[dict]:
        yield {"kind": "info", "time": time.time(), "address": self.address}
        failures = 0
        while True:
            try:
                async for event in self._follow():
                    failures = 0
                    yield event
                reason = "the server closed the event stream"
            except (httpx.HTTPError, Refused, ValueError) as e:
                reason = describe(e)
            delay = RETRY_S[min(failures, len(RETRY_S) - 1)]
            failures += 1
            yield {"kind": "connection", "time": time.time(), "state": "unreachable", "error": reason, "retry_s": delay}
            await asyncio.sleep(delay)

    async def _follow(self) -> AsyncIterator[dict]:
        """One connection: the server's state, its known transcripts, then its events as they come."""
        health = await self._get("/health")
        summaries = (await self._get("/v1/transcripts"))["data"]
        async with self.client.stream("GET", "/v1/events") as response:
            if response.status_code != 200:
                raise Refused(refusal(response, await response.aread()))
            now = time.time()
            yield {"kind": "connection", "time": now, "state": "connected"}
            yield {"kind": "info", "time": now, "model": health.get("model"), "blas": health.get("blas"),
                   "dtype": health.get("dtype"), "tool_parser": health.get("tool_parser"),
                   **({"started_at": now - health["uptime_s"]} if "uptime_s" in health else {})}
            if state := WORKER_STATES.get(health.get("status")):
                yield {"kind": "worker", "time": now, "state": state, **(health.get("worker") or {})}
            yield {"kind": "breaker", "time": now, **(health.get("breaker") or {})}
            for summary in summaries:
                yield {"kind": "transcript", "time": now, "id": summary["id"], "step": "finish", "summary": summary}
            async for data in sse_data(response):
                event = json.loads(data)
                if event["time"] <= self._last_seen:
                    continue  # replayed after a reconnect: already applied
                self._last_seen = event["time"]
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

    async def chat(self, request: Request) -> AsyncIterator[Event]:
        """The reply streamed by `/v1/chat/completions`, as engine events."""
        started = time.monotonic()
        first = None
        try:
            headers = {"user-agent": request.client}
            async with self.client.stream("POST", "/v1/chat/completions", json=chat_body(request), headers=headers) as response:
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


def chat_body(request: Request) -> dict:
    messages = []
    for message in request.messages:
        if "tool_calls" in message:
            calls = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                     for c in message["tool_calls"]]
            message = {**message, "tool_calls": calls}
        messages.append(message)
    body = {
        "model": "mlx-tui", "messages": messages, "stream": True, "stream_options": {"include_usage": True},
        "temperature": request.sampling.temperature,
    }
    if request.tools:
        body["tools"] = request.tools
    return body


class ChunkReader:
    """Turns OpenAI chat-completion chunks back into engine events."""

    def __init__(self):
        self.calls: dict[int, dict] = {}
        self.stop_reason = "end"
        self.usage = Usage(0, 0, 0)
        self.error: Error | None = None

    def read(self, chunk: dict) -> list[Event]:
        if "error" in chunk:
            self.error = Error(chunk["error"].get("type", "engine"), chunk["error"].get("message", ""))
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
                self.stop_reason = STOP_REASONS.get(reason, reason)
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
