"""The Textual app: tabs for the dashboard, chat, transcripts and log, drawn from one state model.

A backend feeds it: `LocalBackend` (the engine in this process, serving the API from this
event loop) or `RemoteBackend` (a server elsewhere, over HTTP). Events are applied to the
state as they come. Only the view on show draws, at most once a second for what streams
(stats, request rows, transcript text: each draw renders a whole widget); a hidden view
catches up when it is shown.
"""

from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import Protocol

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Footer, TabbedContent, TabPane

from mlx_tui.engine.events import Event
from mlx_tui.engine.request import GenerationRequest

from .changes import Changes, EventArrived
from .chat import ChatView
from .dashboard import DashboardView
from .help import HelpScreen, bindings
from .logview import LoggerRoute, LogRecordPosted, LogView
from .state import DashboardEvent, State
from .transcripts import TranscriptsView


class Backend(Protocol):
    address: str

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def events(self) -> AsyncIterator[DashboardEvent]: ...

    def chat(self, request: GenerationRequest) -> AsyncGenerator[Event, None]: ...

    async def transcript(self, id: str) -> dict | None: ...


TABS = {"dashboard": "Dashboard", "chat": "Chat", "transcripts": "Transcripts", "log": "Log"}
VIEWS: dict[str, type[DashboardView] | type[TranscriptsView]] = {
    "dashboard": DashboardView,
    "transcripts": TranscriptsView,
}  # the tabs drawn from the state


class MlxTui(App):
    TITLE = "mlx-tui"
    CSS_PATH = ["app.tcss", "dashboard.tcss", "chat.tcss", "transcripts.tcss"]
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("question_mark", "help", "Help"),
        *(Binding(str(i), f"tab('{tab}')", title, show=False) for i, (tab, title) in enumerate(TABS.items(), 1)),
    ]
    FLUSH_S = 0.25

    def __init__(self, backend: Backend, state: State | None = None, example_tools: list[dict] | None = None) -> None:
        super().__init__()
        self.backend = backend
        self.example_tools = example_tools
        self.state = state or State()
        self.unseen = {tab: Changes() for tab in VIEWS}  # what each view has not drawn yet
        self.logs = LoggerRoute(self)

    def compose(self) -> ComposeResult:
        with TabbedContent(initial="dashboard"):
            with TabPane("1 Dashboard", id="dashboard"):
                yield DashboardView(self.state)
            with TabPane("2 Chat", id="chat"):
                yield ChatView(self.backend, self.example_tools)
            with TabPane("3 Transcripts", id="transcripts"):
                yield TranscriptsView(self.state, self.backend)
            with TabPane("4 Log", id="log"):
                yield LogView()
        yield Footer()

    def on_mount(self) -> None:
        self.logs.install()
        self.backend.start()
        self.follow_events()
        self.set_interval(self.FLUSH_S, self.flush)
        self.set_interval(1.0, self.tick)

    def on_unmount(self) -> None:
        self.logs.remove()

    @work(group="events")
    async def follow_events(self) -> None:
        async for event in self.backend.events():
            self.ingest(event)

    def ingest(self, event: DashboardEvent) -> None:
        area = self.state.apply(event)
        for changes in self.unseen.values():
            changes.note(area, event)
            changes.forget_gone(self.state)

    def tick(self) -> None:
        for changes in self.unseen.values():
            changes.areas.add("clock")

    def flush(self, now: bool = False) -> None:
        """Redraw what changed in the view on show since it last drew, when the view says it is due (or `now`)."""
        tab = self.query_one(TabbedContent).active
        if tab in VIEWS and (changes := self.unseen[tab]) and (now or VIEWS[tab].due(changes)):
            self.unseen[tab] = Changes()
            self.query_one(VIEWS[tab]).show(changes)

    def on_event_arrived(self, message: EventArrived) -> None:
        self.ingest(message.event)

    def on_log_record_posted(self, message: LogRecordPosted) -> None:
        self.query_one(LogView).add(message.record)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.flush(now=True)
        targets: dict[str | None, str | type[Widget]] = {
            "chat": "#prompt",
            "transcripts": "#transcript-list",
            "dashboard": "#requests-table",
            "log": LogView,
        }
        self.query_one(targets[event.pane.id]).focus()

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_help(self) -> None:
        everywhere = [b for b in bindings(self.BINDINGS) if b.show] + GLOBAL_KEYS
        self.push_screen(
            HelpScreen(
                [
                    ("Everywhere", everywhere),
                    ("Dashboard", bindings(DashboardView.BINDINGS)),
                    ("Chat", [Binding("enter", "", "Send the message"), *bindings(ChatView.BINDINGS)]),
                    ("Transcripts", bindings(TranscriptsView.BINDINGS)),
                ]
            )
        )

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for tab, title in TABS.items():
            yield SystemCommand(title, f"Show the {title.lower()}", lambda tab=tab: self.action_tab(tab))
        yield SystemCommand(
            "Pause charts", "Pause or resume the dashboard's charts", self.query_one(DashboardView).action_pause
        )
        yield SystemCommand("Clear chat", "Start a new conversation", self.query_one(ChatView).action_clear)
        yield SystemCommand("Help", "Show every key binding", self.action_help)


GLOBAL_KEYS = [
    Binding("1,2,3,4", "", "Dashboard, chat, transcripts, log (or click the tabs)"),
    Binding("ctrl+p", "", "Command palette"),
    Binding("tab,shift+tab", "", "Move the focus"),
]
