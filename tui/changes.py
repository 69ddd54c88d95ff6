"""What moved in the state since the views last drew it."""

from dataclasses import dataclass, field

from textual.message import Message

from mlx_tui.engine.bus import RequestStep, TranscriptStep

from .state import DashboardEvent, State


@dataclass(slots=True)
class Changes:
    areas: set[str] = field(default_factory=set)
    requests: set[str] = field(default_factory=set)
    transcripts: set[str] = field(default_factory=set)

    def note(self, area: str, event: DashboardEvent) -> None:
        self.areas.add(area)
        if isinstance(event, RequestStep):
            self.requests.add(event.id)
        elif isinstance(event, TranscriptStep):
            self.transcripts.add(event.id)
            if event.step == "tool_call":  # counted on the request's row too
                self.areas.add("requests")
                self.requests.add(event.id)

    def forget_gone(self, state: State) -> None:
        """Drop the ids `state` no longer keeps, so that a view hidden for long holds no more than it."""
        if len(self.requests) > len(state.requests):
            self.requests &= state.requests.keys()
        if len(self.transcripts) > len(state.transcripts):
            self.transcripts &= state.transcripts.keys()

    def __bool__(self) -> bool:
        return bool(self.areas)


class EventArrived(Message):
    """An event a view fetched itself (a full transcript), for the app to apply."""

    def __init__(self, event: DashboardEvent) -> None:
        super().__init__()
        self.event = event
