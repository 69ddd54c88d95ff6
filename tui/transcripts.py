"""Every request as it happens: what came in, the prompt, the raw model text, the parsed calls, what went back."""

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.json import JSON
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.events import Click, MouseScrollUp
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Checkbox, Collapsible, DataTable, Input, Static

from mlx_tui.engine.bus import TranscriptStep

from . import format as fmt
from .changes import Changes, EventArrived
from .requests import update_row
from .state import State, TranscriptRecord

if TYPE_CHECKING:
    from .app import Backend

COLUMNS = ("time", "id", "source", "calls", "result")
SENT_TAIL = 100  # pieces sent back shown while a request runs: each redraw renders them all
MARKUP = re.compile(r"</?[A-Za-z_][\w|]*>|<\|[^|]+\|>")


class Unfollow(Message):
    """The user moved away from the newest transcript."""


class TranscriptList(DataTable):
    """The transcripts, oldest first; moving up or clicking stops following the newest."""

    def _leave(self) -> None:
        self.post_message(Unfollow())

    def action_cursor_up(self) -> None:
        super().action_cursor_up()
        self._leave()

    def action_page_up(self) -> None:
        super().action_page_up()
        self._leave()

    def action_scroll_home(self) -> None:
        super().action_scroll_home()
        self._leave()

    def action_scroll_top(self) -> None:
        super().action_scroll_top()
        self._leave()

    def _on_mouse_scroll_up(self, event: MouseScrollUp) -> None:
        super()._on_mouse_scroll_up(event)
        self._leave()

    async def _on_click(self, event: Click) -> None:
        await super()._on_click(event)
        self._leave()


class TranscriptDetail(VerticalScroll):
    """One transcript, section by section; scrolling up stops following."""

    TITLES = {
        "prompt": "prompt as rendered",
        "raw": "raw model text",
        "calls": "parsed tool calls",
        "sent": "sent back",
    }

    def compose(self) -> ComposeResult:
        yield Static(id="section-summary", classes="section")
        with Collapsible(title="request as received", collapsed=True, id="received"):
            yield Static(id="section-received")
        for section in self.TITLES:
            yield Static(id=f"section-{section}", classes="section")

    def on_mount(self) -> None:
        for section, title in self.TITLES.items():
            self.query_one(f"#section-{section}").border_title = title
        self._signatures: dict[str, object] = {}

    def action_scroll_up(self) -> None:
        super().action_scroll_up()
        self.post_message(Unfollow())

    def action_page_up(self) -> None:
        super().action_page_up()
        self.post_message(Unfollow())

    def action_scroll_home(self) -> None:
        super().action_scroll_home()
        self.post_message(Unfollow())

    def _on_mouse_scroll_up(self, event: MouseScrollUp) -> None:
        super()._on_mouse_scroll_up(event)
        self.post_message(Unfollow())

    def show(self, t: TranscriptRecord | None) -> None:
        if t is None:
            self._signatures.clear()
            self.query_one("#section-summary", Static).update(Text("No transcript selected.", style="dim"))
            for section in ("received", *self.TITLES):
                self.query_one(f"#section-{section}", Static).update("")
            return
        self._section(
            "summary",
            (t.id, t.stop_reason, t.error, t.finished, t.complete, len(t.tool_calls), t.constraint),
            lambda: summary(t),
        )
        self._section("received", (t.id, t.received is None), lambda: self._received(t))
        self._section("prompt", (t.id, len(t.prompt), t.cached_chars), lambda: prompt(t))
        self._section("raw", (t.id, len(t.raw)), lambda: raw(t))
        self._section("calls", (t.id, len(t.tool_calls), len(t.parse_errors)), lambda: calls(t))
        self._section("sent", (t.id, len(t.sent), t.finished), lambda: sent(t))

    def _received(self, t: TranscriptRecord) -> str | JSON:
        if t.received is None:
            self.query_one("#received", Collapsible).title = "request as received: not known"
            return ""
        body = json.dumps(t.received, ensure_ascii=False)
        self.query_one("#received", Collapsible).title = f"request as received ({len(body):,} characters of JSON)"
        return JSON(body)

    def _section(self, name: str, signature: tuple, render: Callable[[], RenderableType]) -> None:
        if self._signatures.get(name) != signature:
            self._signatures[name] = signature
            self.query_one(f"#section-{name}", Static).update(render())


def dim(text: str) -> Text:
    return Text(text, style="dim")


def summary(t: TranscriptRecord) -> Text:
    text = Text.assemble((t.id, "bold"), f"  {t.source or fmt.DASH} · {t.client or fmt.DASH} · {fmt.clock(t.started)}")
    text.append(f"\n{t.prompt_tokens:,} prompt tokens, {t.cached_tokens:,} from the prefix cache · ")
    text.append(f"{len(t.tool_calls)} tool call{'' if len(t.tool_calls) == 1 else 's'} · ")
    text.append(*result(t))
    if t.drafted_tokens:
        text.append(f"\n{t.generated_tokens:,} tokens generated, {t.drafted_tokens:,} of them from accepted drafts")
    if t.constraint:
        text.append(f"\n◆ under a grammar: {t.constraint}", style="magenta")
    if not t.complete:
        text.append("\nonly its summary is known (it began before the dashboard attached)", style="yellow")
    return text


def result(t: TranscriptRecord) -> tuple[str, str]:
    if t.error:
        return t.error, "bold red"
    if t.parse_errors:
        return "parse error", "bold red"
    if t.finished is None:
        return "running…", "cyan"
    return t.stop_reason or "finished", "green"


def prompt(t: TranscriptRecord) -> Text:
    if not t.prompt:
        return dim("not rendered yet")
    text = markup(t.prompt)
    if not t.cached_chars:
        return text
    text.stylize("on #1f3a2a", 0, t.cached_chars)
    note = f"▌ the first {t.cached_chars:,} characters came from the prefix cache (shaded)\n"
    return Text.assemble((note, "green"), text)


def raw(t: TranscriptRecord) -> Text:
    """The raw text, the part a grammar bound underlined."""
    if not t.raw:
        return dim("nothing yet")
    text = markup(t.raw)
    if t.constrained_at is None:
        return text
    text.stylize("underline", t.constrained_at)
    note = f"▌ bound by the grammar from character {t.constrained_at:,} (underlined)\n"
    return Text.assemble((note, "magenta"), text)


def markup(raw: str) -> Text:
    """The raw text with its markup (tool-call and reasoning tags, special tokens) picked out."""
    text = Text(raw)
    text.highlight_regex(MARKUP, "bold magenta")
    return text


def calls(t: TranscriptRecord) -> Group | Text:
    parts: list[Text | JSON] = []
    for call in t.tool_calls:
        parts.append(Text.assemble(("● ", "green"), (call["name"], "bold"), f"  {call.get('id', '')}", style=""))
        parts.append(JSON.from_data(call["arguments"]))
    for error in t.parse_errors:
        parts.append(Text(f"✖ parse error: {error['message']}", style="bold red"))
        parts.append(Text(error["text"], style="red on #3a1f1f"))
    return Group(*parts) if parts else dim("none")


def sent(t: TranscriptRecord) -> Text:
    """What went back; while the request runs, only its last pieces (a long stream has thousands)."""
    if not t.sent:
        return dim("nothing yet")
    if t.finished is None and len(t.sent) > SENT_TAIL:
        earlier = dim(f"… {len(t.sent) - SENT_TAIL:,} earlier pieces, shown once it ends\n")
        return Text.assemble(earlier, "\n".join(t.sent[-SENT_TAIL:]))
    return Text("\n".join(t.sent))


def row(t: TranscriptRecord) -> tuple:
    text, style = result(t)
    calls = str(len(t.tool_calls)) if t.tool_calls else fmt.DASH
    return fmt.clock(t.started), fmt.short_id(t.id, 13), t.source or fmt.DASH, calls, Text(text[:24], style=style)


class TranscriptsView(Horizontal):
    BINDINGS = [
        Binding("slash", "filter", "Filter"),
        Binding("t", "toggle('only-tools')", "Tool calls only"),
        Binding("x", "toggle('only-errors')", "Errors only"),
        Binding("f", "follow", "Follow"),
        Binding("e", "export", "Export JSON"),
        Binding("c", "copy", "Copy JSON"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    follow: reactive[bool] = reactive(True)

    def __init__(self, state: State, backend: "Backend", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state = state
        self.backend = backend
        self.selected: str | None = None
        self.fetched: set[str] = set()  # incomplete transcripts already asked for

    def compose(self) -> ComposeResult:
        with Vertical(id="transcript-pane"):
            with Horizontal(id="transcript-filters"):
                yield Input(placeholder="/ filter", id="transcript-filter")
                yield Checkbox("tool calls", id="only-tools")
                yield Checkbox("errors", id="only-errors")
            yield TranscriptList(cursor_type="row", id="transcript-list")
        yield TranscriptDetail(id="transcript-detail")

    def on_mount(self) -> None:
        table = self.query_one(TranscriptList)
        for name in COLUMNS:
            table.add_column(name, key=name)
        self.watch_follow()
        self.show(Changes())

    def watch_follow(self) -> None:
        pane = self.query_one("#transcript-pane")
        pane.border_title = "Transcripts"
        pane.border_subtitle = "following the newest" if self.follow else "not following (f to follow)"
        if self.follow:
            self._to_newest()

    def wanted(self) -> list[TranscriptRecord]:
        text = self.query_one("#transcript-filter", Input).value.lower()
        tools = self.query_one("#only-tools", Checkbox).value
        errors = self.query_one("#only-errors", Checkbox).value
        return [
            t
            for t in self.state.transcripts.values()
            if (not tools or t.tool_calls)
            and (not errors or t.failed)
            and (not text or any(text in (f or "").lower() for f in (t.id, t.source, t.client, t.stop_reason, t.error)))
        ]

    @staticmethod
    def due(changes: Changes) -> bool:
        """Whether to draw now: once a second while transcripts change (a streaming one redraws its text in full)."""
        return "clock" in changes.areas and bool(changes.transcripts)

    def show(self, changes: Changes) -> None:
        table = self.query_one(TranscriptList)
        shown = [key.value for key in table.rows]
        wanted = self.wanted()
        ids = [t.id for t in wanted]
        if ids[: len(shown)] != shown:
            table.clear()
            shown = []
        for t in wanted[len(shown) :]:
            table.add_row(*row(t), key=t.id)
        for id in changes.transcripts & set(shown):
            update_row(table, id, COLUMNS, row(self.state.transcripts[id]))
        if self.follow:
            self._to_newest()
        if self.selected is None or self.selected in changes.transcripts or self.selected not in ids:
            self._show_selected()

    def _to_newest(self) -> None:
        table = self.query_one(TranscriptList)
        if table.row_count:
            table.move_cursor(row=table.row_count - 1, animate=False)
            self.selected = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        self._show_selected()

    def _show_selected(self) -> None:
        detail = self.query_one(TranscriptDetail)
        record = self.state.transcripts.get(self.selected) if self.selected else None
        detail.show(record)
        if self.follow:
            detail.scroll_end(animate=False)
        if record is not None and not record.complete and record.id not in self.fetched:
            self.fetched.add(record.id)
            self.fetch(record.id)

    @work(exclusive=True, group="fetch")
    async def fetch(self, id: str) -> None:
        if data := await self.backend.transcript(id):
            self.post_message(EventArrived(TranscriptStep(id=id, step="full", transcript=data, time=0.0)))

    def on_show(self) -> None:
        if self.follow:
            self._to_newest()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.selected = event.row_key.value
        self._show_selected()

    def on_unfollow(self, _: Unfollow) -> None:
        self.follow = False

    def on_input_changed(self, event: Input.Changed) -> None:
        self.show(Changes())

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        self.show(Changes())

    def action_filter(self) -> None:
        self.query_one("#transcript-filter", Input).focus()

    def action_clear_filter(self) -> None:
        self.query_one("#transcript-filter", Input).value = ""
        self.query_one(TranscriptList).focus()

    # our own action: Textual's DOMNode has an async action_toggle of an attribute, which this one replaces here
    def action_toggle(self, id: str) -> None:  # type: ignore[override]
        self.query_one(f"#{id}", Checkbox).toggle()

    def action_follow(self) -> None:
        self.follow = True

    def _selected_json(self) -> str | None:
        record = self.state.transcripts.get(self.selected) if self.selected else None
        if record is None:
            self.notify("No transcript selected.", severity="warning")
            return None
        return json.dumps(record.as_dict(), indent=2, ensure_ascii=False)

    def action_export(self) -> None:
        if text := self._selected_json():
            path = Path.cwd() / f"transcript-{self.selected}.json"
            path.write_text(text + "\n", encoding="utf-8")
            self.notify(f"Saved {path}")

    def action_copy(self) -> None:
        if text := self._selected_json():
            self.app.copy_to_clipboard(text)
            self.notify("Copied the transcript as JSON.")
