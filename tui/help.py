"""The help screen: every key binding, by where it works."""

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

MOUSE = [
    ("click", "switch tabs, pick a row, expand the reasoning, toggle a checkbox"),
    ("wheel", "scroll; scrolling up in the transcripts stops following the newest"),
]


def key_name(key: str) -> str:
    return {"question_mark": "?", "slash": "/", "space": "space"}.get(key, key)


def bindings(listed: list[BindingType]) -> list[Binding]:
    """A widget's `BINDINGS` as the Binding objects they are here (Textual also allows tuples)."""
    return [b for b in listed if isinstance(b, Binding)]


def bindings_table(groups: list[tuple[str, list[Binding]]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for title, bindings in groups:
        table.add_row(Text(title, style="bold underline"), "")
        for b in bindings:
            table.add_row(", ".join(key_name(k) for k in b.key.split(",")), b.description)
        table.add_row("", "")
    table.add_row(Text("Mouse", style="bold underline"), "")
    for what, does in MOUSE:
        table.add_row(what, does)
    return table


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,question_mark,q", "app.pop_screen", "Close help")]

    def __init__(self, groups: list[tuple[str, list[Binding]]]) -> None:
        super().__init__()
        self.groups = groups

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help") as scroll:
            scroll.border_title = "Keys · esc closes"
            yield Static(bindings_table(self.groups))
