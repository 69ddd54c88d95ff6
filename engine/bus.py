"""The front process's event bus: engine-wide events for the dashboard and `GET /v1/events`.

Each event is a small dataclass; `encode` and `decode` are the one JSON codec, used by
`/v1/events` and by the dashboard attached to it (`mlx-tui --attach`), so the dashboard
reads the same objects in-process and attached. On the wire an event is one JSON object
`{"kind", "time", ...fields}`; a field that is None is left out.
"""

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

Phase = Literal["queued", "prefill", "generating", "done", "error", "cancelled"]
TranscriptStepName = Literal["open", "prompt", "raw", "tool_call", "parse_error", "sent", "finish", "full"]


@dataclass(slots=True, frozen=True, kw_only=True)
class RequestStep:
    """One step of a request's life, under the id the API and the dashboard show."""

    KIND: ClassVar[str] = "request"
    id: str
    phase: Phase
    time: float = field(default_factory=time.time)
    source: str | None = None  # queued
    client: str | None = None  # queued
    prompt_tokens: int | None = None  # prefill (started), done
    cached_tokens: int | None = None  # prefill (started), done
    constraint: str | None = None  # prefill (started): the grammar the reply is bound to, if any
    done: int | None = None  # prefill progress
    total: int | None = None  # prefill progress
    stop_reason: str | None = None  # done
    note: str | None = None  # done
    generated_tokens: int | None = None  # done
    ttft_s: float | None = None  # done
    decode_s: float | None = None  # done
    error_kind: str | None = None  # error
    message: str | None = None  # error


@dataclass(slots=True, frozen=True, kw_only=True)
class WorkerChange:
    """The worker's state ("loading", "ready", "restarting", "failed", "stopping", "stopped"), or a step or failure."""

    KIND: ClassVar[str] = "worker"
    state: str
    time: float = field(default_factory=time.time)
    pid: int | None = None
    restarts: int | None = None
    phase: str | None = None  # loading
    fraction: float | None = None  # loading
    failure: str | None = None  # an engine failure the breaker counted
    message: str | None = None  # why it failed
    exit_code: int | None = None  # restarting


@dataclass(slots=True, frozen=True, kw_only=True)
class BreakerChange:
    KIND: ClassVar[str] = "breaker"
    state: str
    time: float = field(default_factory=time.time)
    failures: int | None = None
    next_probe_s: float | None = None


@dataclass(slots=True, frozen=True, kw_only=True)
class StatsTick:
    """Once a second: the worker's stats (`values`, from `Scheduler.stats`, with throughput) and the engine's state."""

    KIND: ClassVar[str] = "stats"
    values: dict[str, Any]
    time: float = field(default_factory=time.time)
    breaker: dict[str, Any] | None = None
    state: str | None = None
    restarts: int | None = None
    pid: int | None = None
    rank_states: list[dict[str, Any]] | None = None


@dataclass(slots=True, frozen=True, kw_only=True)
class TranscriptStep:
    """A transcript changed: opened, its prompt, raw text, a call, a parse error, what was sent, finished; or whole."""

    KIND: ClassVar[str] = "transcript"
    id: str
    step: TranscriptStepName
    time: float = field(default_factory=time.time)
    summary: dict[str, Any] | None = None  # open, finish
    received: Any = None  # open
    prompt: str | None = None  # prompt
    cached_chars: int | None = None  # prompt
    constraint: str | None = None  # prompt: the grammar the reply runs under
    constraint_from: str | None = None  # prompt: the markup after which it binds
    text: str | None = None  # raw
    texts: list[str] | None = None  # sent
    call: dict[str, Any] | None = None  # tool_call
    error: dict[str, Any] | None = None  # parse_error
    transcript: dict[str, Any] | None = None  # full (fetched by the dashboard, never published)


@dataclass(slots=True, frozen=True, kw_only=True)
class LogLine:
    KIND: ClassVar[str] = "log"
    source: str
    line: str
    time: float = field(default_factory=time.time)


BusEvent = RequestStep | WorkerChange | BreakerChange | StatsTick | TranscriptStep | LogLine
KINDS: dict[str, type[BusEvent]] = {
    c.KIND: c for c in (RequestStep, WorkerChange, BreakerChange, StatsTick, TranscriptStep, LogLine)
}


def encode(event: BusEvent) -> dict[str, Any]:
    """The event as its JSON object (a stats tick's values inline, as they always were)."""
    data: dict[str, Any] = {"kind": event.KIND}
    for f in fields(event):
        value = getattr(event, f.name)
        if f.name == "values":
            data.update(value)
        elif value is not None:
            data[f.name] = value
    return data


def decode(data: dict[str, Any]) -> BusEvent:
    """The event a JSON object from `encode` stands for; KeyError or TypeError if it is none."""
    cls = KINDS[data["kind"]]
    names = {f.name for f in fields(cls)}
    known = {k: v for k, v in data.items() if k in names}
    if cls is StatsTick:
        known["values"] = {k: v for k, v in data.items() if k not in names and k != "kind"}
    return cls(**known)


class EventBus:
    """Publishes events to every subscriber; a slow subscriber loses its oldest."""

    def __init__(self, history: int = 200, backlog: int = 1000) -> None:
        self.recent: deque[BusEvent] = deque(maxlen=history)
        self.backlog = backlog
        self._subscribers: set[asyncio.Queue[BusEvent]] = set()

    def publish(self, event: BusEvent) -> BusEvent:
        self.recent.append(event)
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)
        return event

    async def subscribe(self, replay: bool = False) -> AsyncIterator[BusEvent]:
        """Events from now on (after the recent ones, with `replay`), until the caller stops."""
        queue: asyncio.Queue[BusEvent] = asyncio.Queue(self.backlog)
        for event in self.recent if replay else ():
            queue.put_nowait(event)
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)
