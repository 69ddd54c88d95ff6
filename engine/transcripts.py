"""Per-request transcripts: what came in, the prompt, the raw model text, the parsed calls, what went back.

Kept in memory (the most recent ones) and, unless disabled, appended to a JSONL file
created 0600 under the user's data directory and rotated when it grows past its bound.
Published on the bus as they change; the raw text and what is sent, which grow with every
token, at most every `Transcripts.INTERVAL` seconds per request.
"""

import asyncio
import json
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .bus import EventBus, TranscriptStep, TranscriptStepName
from .events import Done, Error, Event, ParseError, RawText, Started, ToolCallEnd


@dataclass(slots=True)
class Transcript:
    id: str
    source: str = ""
    client: str = ""
    received: Any = None
    started: float = field(default_factory=time.time)
    prompt: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cached_chars: int = 0
    constraint: str = ""  # the grammar the reply ran under ("": none)
    constraint_from: str = ""  # the markup after which it bound ("": from the start)
    constrained_at: int | None = None  # where in `raw` the grammar began to bind
    raw: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    parse_errors: list[dict] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    stop_reason: str | None = None
    generated_tokens: int = 0
    drafted_tokens: int = 0  # of the generated, those that came from accepted speculative drafts
    error: str | None = None
    finished: float | None = None

    def add_raw(self, text: str) -> None:
        """Add generated text, noting where the grammar began to bind once its marker has appeared."""
        self.raw += text
        if self.constraint and self.constrained_at is None:
            at = self.raw.find(self.constraint_from) if self.constraint_from else 0
            self.constrained_at = None if at < 0 else at + len(self.constraint_from)

    def summary(self) -> dict:
        """The fields a list view needs, without the large ones."""
        return {
            "id": self.id,
            "source": self.source,
            "client": self.client,
            "started": self.started,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "constraint": self.constraint,
            "tool_calls": len(self.tool_calls),
            "parse_errors": len(self.parse_errors),
            "stop_reason": self.stop_reason,
            "generated_tokens": self.generated_tokens,
            "drafted_tokens": self.drafted_tokens,
            "error": self.error,
            "finished": self.finished,
        }


@dataclass(slots=True)
class Unpublished:
    """A transcript's raw text and sent pieces that the bus has not seen yet."""

    raw: str = ""
    sent: list[str] = field(default_factory=list)
    due: float = 0.0  # when they may next be published (time.monotonic)
    timer: asyncio.TimerHandle | None = None


class Transcripts:
    """The recorder: `open` one per request, feed it the engine's events and what is sent, `finish` it."""

    INTERVAL = 0.1

    def __init__(self, bus: EventBus, directory: Path | None, keep: int = 200, file_bytes: int = 64 * 2**20) -> None:
        self.bus = bus
        self.keep = keep
        self.file_bytes = file_bytes
        self.path = directory / "transcripts.jsonl" if directory else None
        self.items: OrderedDict[str, Transcript] = OrderedDict()
        self.unpublished: dict[str, Unpublished] = {}

    def open(self, id: str, source: str, client: str, received: Any) -> Transcript:
        t = Transcript(id, source, client, received)
        self.items[id] = t
        while len(self.items) > self.keep:
            self.items.popitem(last=False)
        self.bus.publish(TranscriptStep(id=id, step="open", summary=t.summary(), received=received))
        return t

    def record(self, t: Transcript, event: Event) -> None:
        """Note one engine event in the transcript and publish what changed."""
        if isinstance(event, Started):
            t.prompt, t.prompt_tokens = event.prompt_text, event.prompt_tokens
            t.cached_tokens, t.cached_chars = event.cached_tokens, event.cached_chars
            t.constraint, t.constraint_from = event.constraint, event.constraint_from
            self._publish(
                t,
                step="prompt",
                prompt=t.prompt,
                cached_chars=t.cached_chars,
                constraint=t.constraint,
                constraint_from=t.constraint_from,
            )
        elif isinstance(event, RawText):
            t.add_raw(event.text)
            self._unpublished(t).raw += event.text
            self._publish_soon(t)
        elif isinstance(event, ToolCallEnd):
            call = {"id": event.id, "name": event.name, "arguments": event.arguments}
            t.tool_calls.append(call)
            self._publish(t, step="tool_call", call=call)
        elif isinstance(event, ParseError):
            error = {"message": event.message, "text": event.text}
            t.parse_errors.append(error)
            self._publish(t, step="parse_error", error=error)
        elif isinstance(event, Done):
            t.stop_reason = event.stop_reason
            t.generated_tokens, t.drafted_tokens = event.usage.generated_tokens, event.usage.drafted_tokens
        elif isinstance(event, Error):
            t.error = f"{event.kind}: {event.message}"

    def sent(self, t: Transcript, text: str) -> None:
        t.sent.append(text)
        self._unpublished(t).sent.append(text)
        self._publish_soon(t)

    def finish(self, t: Transcript) -> None:
        t.finished = time.time()
        self._publish(t, step="finish", summary=t.summary())
        if pending := self.unpublished.pop(t.id, None):
            if pending.timer:
                pending.timer.cancel()
        if self.path:
            self._append(self.path, json.dumps(asdict(t), ensure_ascii=False) + "\n")

    def _unpublished(self, t: Transcript) -> Unpublished:
        if (pending := self.unpublished.get(t.id)) is None:
            pending = self.unpublished[t.id] = Unpublished()
        return pending

    def _publish_soon(self, t: Transcript) -> None:
        """Publish the growing parts now if the last time was long enough ago, else once it is."""
        pending = self.unpublished[t.id]
        wait = pending.due - time.monotonic()
        if wait <= 0:
            self._publish_growth(t)
        elif pending.timer is None:
            pending.timer = asyncio.get_running_loop().call_later(wait, self._publish_growth, t)

    def _publish_growth(self, t: Transcript) -> None:
        pending = self.unpublished.get(t.id)
        if pending is None:
            return
        if pending.timer:
            pending.timer.cancel()
            pending.timer = None
        if not (pending.raw or pending.sent):
            return
        if pending.raw:
            self.bus.publish(TranscriptStep(id=t.id, step="raw", text=pending.raw))
            pending.raw = ""
        if pending.sent:
            self.bus.publish(TranscriptStep(id=t.id, step="sent", texts=pending.sent))
            pending.sent = []
        pending.due = time.monotonic() + self.INTERVAL

    def _publish(self, t: Transcript, step: TranscriptStepName, **data: Any) -> None:
        """Publish one step, after the growth before it, so the bus keeps the transcript's order."""
        self._publish_growth(t)
        self.bus.publish(TranscriptStep(id=t.id, step=step, **data))

    def _append(self, path: Path, line: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists() and path.stat().st_size + len(line) > self.file_bytes:
            os.replace(path, path.with_suffix(".jsonl.1"))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(line)
