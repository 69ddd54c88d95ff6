"""Streaming clients that time each response: first text, last text, tokens and cached tokens from usage."""

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Timed:
    """One streamed response, timed on the client's clock (seconds since the request was sent)."""

    ttft: float | None = None
    last: float | None = None
    total: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    generated: int = 0
    text: str = ""
    chunks: int = 0
    error: str | None = None

    @property
    def decode_tps(self) -> float | None:
        """Tokens per second after the first: (generated - 1) / (last text - first text)."""
        if self.ttft is None or self.last is None or self.generated < 2 or self.last <= self.ttft:
            return None
        return (self.generated - 1) / (self.last - self.ttft)

    @property
    def cached_share(self) -> float | None:
        if self.cached_tokens is None or not self.prompt_tokens:
            return None
        return self.cached_tokens / self.prompt_tokens


@dataclass
class Sse:
    event: str | None = None
    data: list[str] = field(default_factory=list)


async def sse_events(response: httpx.Response):
    """(event name, parsed data) for each server-sent event; "[DONE]" comes as data None."""
    pending = Sse()
    async for line in response.aiter_lines():
        if not line:
            if pending.data:
                raw = "\n".join(pending.data)
                yield pending.event, None if raw == "[DONE]" else json.loads(raw)
            pending = Sse()
        elif line.startswith("event:"):
            pending.event = line[6:].strip()
        elif line.startswith("data:"):
            pending.data.append(line[5:].lstrip())
    if pending.data:
        raw = "\n".join(pending.data)
        yield pending.event, None if raw == "[DONE]" else json.loads(raw)


async def openai_stream(client: httpx.AsyncClient, url: str, body: dict) -> Timed:
    """POST /v1/chat/completions with stream and usage; time the content deltas."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    out = Timed()
    start = time.perf_counter()
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            out.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
            return out
        async for _, data in sse_events(response):
            if data is None:
                continue
            if "error" in data:
                out.error = json.dumps(data["error"])[:300]
            for choice in data.get("choices") or []:
                delta = choice.get("delta") or {}
                piece = delta.get("content") or delta.get("reasoning") or delta.get("reasoning_content")
                if piece or delta.get("tool_calls"):
                    now = time.perf_counter() - start
                    out.ttft = out.ttft if out.ttft is not None else now
                    out.last = now
                    out.chunks += 1
                    out.text += piece or ""
            if usage := data.get("usage"):
                out.prompt_tokens = usage.get("prompt_tokens", 0)
                out.generated = usage.get("completion_tokens", 0)
                details = usage.get("prompt_tokens_details") or {}
                out.cached_tokens = details.get("cached_tokens")
    out.total = time.perf_counter() - start
    return out


async def anthropic_stream(client: httpx.AsyncClient, url: str, body: dict, headers: dict | None = None) -> Timed:
    """POST /v1/messages with stream; prompt = input + cache read + cache creation (Anthropic's arithmetic)."""
    body = {**body, "stream": True}
    out = Timed()
    usage: dict = {}
    start = time.perf_counter()
    headers = {"anthropic-version": "2023-06-01", **(headers or {})}
    async with client.stream("POST", url + "/v1/messages?beta=true", json=body, headers=headers) as response:
        if response.status_code != 200:
            out.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
            return out
        async for event, data in sse_events(response):
            if data is None:
                continue
            kind = data.get("type", event)
            if kind == "message_start":
                usage.update(data["message"].get("usage") or {})
            elif kind == "content_block_delta":
                delta = data.get("delta") or {}
                piece = delta.get("text") or delta.get("thinking") or delta.get("partial_json")
                if piece:
                    now = time.perf_counter() - start
                    out.ttft = out.ttft if out.ttft is not None else now
                    out.last = now
                    out.chunks += 1
                    out.text += delta.get("text") or ""
            elif kind == "message_delta":
                usage.update(data.get("usage") or {})
            elif kind == "error":
                out.error = json.dumps(data.get("error"))[:300]
    out.total = time.perf_counter() - start
    read = usage.get("cache_read_input_tokens") or 0
    created = usage.get("cache_creation_input_tokens") or 0
    out.prompt_tokens = (usage.get("input_tokens") or 0) + read + created
    out.cached_tokens = read
    out.generated = usage.get("output_tokens", 0)
    return out
