"""The live table of recent requests, newest on top, with a long prefill's progress on its row."""

from typing import Any

from rich.text import Text
from textual.widgets import DataTable

from . import format as fmt
from .state import RequestRow, State

COLUMNS = ("time", "id", "protocol", "client", "state", "prompt", "cached", "gen", "TTFT", "tok/s", "tools", "result")
PHASE_STYLES = {"queued": "dim", "generating": "cyan", "done": "green", "error": "red", "cancelled": "yellow"}


def phase_cell(row: RequestRow) -> Text:
    if row.phase == "prefill" and row.prefill_total:
        fraction = row.prefill_done / row.prefill_total
        filled = round(fraction * 6)
        return Text("▰" * filled + "▱" * (6 - filled) + f" {fraction:4.0%}", style="magenta")
    return Text(row.phase, style=PHASE_STYLES.get(row.phase, ""))


def result_cell(row: RequestRow) -> Text | str:
    if row.error:
        return Text(row.error[:60], style="red")
    if row.stop_reason:
        return f"{row.stop_reason} ({row.note})" if row.note else row.stop_reason
    return fmt.DASH


def protocol_cell(row: RequestRow) -> Text | str:
    """The protocol, marked ◆ when a grammar binds the reply (a schema, or forced or strict tool calls)."""
    if not row.constraint:
        return row.source or fmt.DASH
    return Text.assemble(row.source or fmt.DASH, (" ◆", "magenta"))


def cells(row: RequestRow) -> tuple:
    done = row.phase == "done"
    return (
        fmt.clock(row.received),
        fmt.short_id(row.id),
        protocol_cell(row),
        (row.client or fmt.DASH)[:18],
        phase_cell(row),
        fmt.number(row.prompt_tokens or None),
        fmt.number(row.cached_tokens if row.prompt_tokens else None),
        fmt.number(row.generated_tokens if done else None),
        fmt.seconds(row.ttft_s),
        fmt.number(row.tokens_per_s, 1),
        str(row.tool_calls) if row.tool_calls else fmt.DASH,
        result_cell(row),
    )


def update_row(table: DataTable, key: str, columns: tuple[str, ...], values: tuple) -> None:
    """Update the cells of a row that changed: any update redraws every visible cell of the table."""
    for name, old, new in zip(columns, table.get_row(key), values, strict=False):
        if new != old:
            table.update_cell(key, name, new, update_width=True)


def matches(row: RequestRow, text: str) -> bool:
    fields = (row.id, row.source, row.client, row.phase, row.stop_reason or "", row.error or "", row.constraint)
    return any(text in f.lower() for f in fields)


class RequestsTable(DataTable):
    """Rows follow `state.requests`; `filter` keeps those whose text contains it."""

    def __init__(self, state: State, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.state = state
        self.filter = ""

    def on_mount(self) -> None:
        for name in COLUMNS:
            self.add_column(name, key=name)

    def show(self, ids: set[str]) -> None:
        """Redraw the rows of `ids`; rebuild the table when rows come or go."""
        shown = {key.value for key in self.rows}
        wanted = [r for r in reversed(self.state.requests.values()) if matches(r, self.filter)]
        if {r.id for r in wanted} != shown:
            self.rebuild(wanted)
            return
        for id in ids & shown:
            update_row(self, id, COLUMNS, cells(self.state.requests[id]))

    def rebuild(self, rows: list[RequestRow]) -> None:
        selected = self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value if self.row_count else None
        self.clear()
        for row in rows:
            self.add_row(*cells(row), key=row.id)
        if selected is not None and selected in self.state.requests and any(r.id == selected for r in rows):
            self.move_cursor(row=self.get_row_index(selected))

    def set_filter(self, text: str) -> None:
        self.filter = text.lower()
        self.show(set())
