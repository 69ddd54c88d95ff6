"""The chat's turns: the user's message, and the assistant's reply built up from the engine's events."""

import time
from typing import Any

from rich.json import JSON
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.timer import Timer
from textual.widgets import Collapsible, Static

from mlx_tui.engine.events import (
    Done,
    Error,
    Event,
    ParseError,
    PrefillProgress,
    Queued,
    ReasoningDelta,
    Started,
    TextDelta,
    ToolCallAbandoned,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)

from . import format as fmt


class UserTurn(Static):
    def __init__(self, text: str) -> None:
        super().__init__(Text(text))
        self.border_title = "you"


class ToolCallCard(Static):
    """One tool call: its name, then its arguments as they stream and, once parsed, as JSON."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.border_title = f"tool call · {name}"
        self.arguments = ""

    def stream(self, text: str) -> None:
        self.arguments += text
        self.update(Text(self.arguments, style="dim"))

    def end(self, arguments: dict) -> None:
        self.update(JSON.from_data(arguments))

    def abandon(self) -> None:
        """The call broke off: its arguments as far as they came, marked as not run."""
        self.border_title = f"{self.border_title} · abandoned"
        self.update(Text(self.arguments or "(no arguments)", style="dim strike"))


class AssistantTurn(Vertical):
    """The reply as it streams; `message()` is what it adds to the conversation.

    Its text is redrawn at most every REDRAW_S seconds while it streams (each redraw lays out
    the whole reply again), and at once when it ends.
    """

    REDRAW_S = 0.1

    def __init__(self) -> None:
        super().__init__()
        self.border_title = "assistant"
        self.text = ""
        self.reasoning = ""
        self.calls: list[dict] = []
        self.cards: dict[int, ToolCallCard] = {}
        self.started = time.monotonic()
        self.failed = False
        self.redraw: Timer | None = None

    def compose(self) -> ComposeResult:
        with Collapsible(title="reasoning", collapsed=True, id="reasoning"):
            yield Static(id="reasoning-text")
        yield Static(id="reply")
        yield Vertical(id="calls")
        yield Static("waiting for the engine…", id="status")

    def on_mount(self) -> None:
        self.query_one("#reasoning").display = False
        self.query_one("#reply").display = False

    def add(self, event: Event) -> None:
        status = self.query_one("#status", Static)
        if isinstance(event, Queued):
            status.update(f"queued behind {event.ahead}")
        elif isinstance(event, Started):
            status.update(f"reading {event.prompt_tokens:,} prompt tokens ({event.cached_tokens:,} cached)")
        elif isinstance(event, PrefillProgress):
            status.update(f"reading the prompt: {event.done:,} / {event.total:,} tokens")
        elif isinstance(event, ReasoningDelta):
            self.reasoning += event.text
            self._draw_soon()
        elif isinstance(event, TextDelta):
            self.text += event.text
            self._draw_soon()
        elif isinstance(event, ToolCallStart):
            self.cards[event.index] = card = ToolCallCard(event.name)
            self.query_one("#calls").mount(card)
        elif isinstance(event, ToolCallDelta):
            self.cards[event.index].stream(event.text)
        elif isinstance(event, ToolCallEnd):
            self.calls.append(
                {"id": event.id, "type": "function", "function": {"name": event.name, "arguments": event.arguments}}
            )
            self.cards[event.index].end(event.arguments)
        elif isinstance(event, ToolCallAbandoned):
            self.cards[event.index].abandon()
        elif isinstance(event, ParseError):
            self.query_one("#calls").mount(Static(Text(f"tool call did not parse: {event.message}", style="red")))
        elif isinstance(event, Done):
            self.draw()
            tps = event.usage.generated_tokens / event.timings.decode_s if event.timings.decode_s else None
            status.update(
                Text(
                    f"{event.stop_reason} · {event.usage.generated_tokens} tokens · {fmt.number(tps, 1)} tok/s · "
                    f"first token after {fmt.seconds(event.timings.queued_s + event.timings.prefill_s)}",
                    style="dim",
                )
            )
        elif isinstance(event, Error):
            self.draw()
            self.failed = True
            status.update(Text(f"{event.kind}: {event.message}", style="bold red"))

    def _draw_soon(self) -> None:
        if self.redraw is None:
            self.redraw = self.set_timer(self.REDRAW_S, self.draw)

    def draw(self) -> None:
        """Show the reasoning and the reply as they are now."""
        if self.redraw:
            self.redraw.stop()
            self.redraw = None
        if self.reasoning:
            self.query_one("#reasoning").display = True
            self.query_one("#reasoning-text", Static).update(Text(self.reasoning, style="italic"))
        if self.text:
            reply = self.query_one("#reply", Static)
            reply.display = True
            reply.update(Text(self.text))
        self.query_one("#status", Static).update("writing…" if self.text else "thinking…")

    def stopped(self) -> None:
        self.draw()
        self.query_one("#status", Static).update(Text("stopped", style="yellow"))

    @property
    def answered(self) -> bool:
        return bool(self.text or self.calls)

    def message(self) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.calls:
            message["tool_calls"] = self.calls
        return message
