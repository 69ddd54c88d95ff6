"""Multi-turn chat with the loaded model, streamed through the same engine (or server) as everything else."""

import asyncio
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Checkbox, Input, Label

from mlx_tui.engine.request import GenerationRequest, Sampling

from .turns import AssistantTurn, UserTurn

if TYPE_CHECKING:
    from .app import Backend

CLIENT = "mlx-tui chat"


class ChatView(Vertical):
    BINDINGS = [
        Binding("escape", "stop", "Stop / leave input"),
        Binding("ctrl+l", "clear", "Clear chat"),
    ]

    def __init__(self, backend: "Backend", example_tools: list[dict] | None = None, **kwargs: Any) -> None:
        """`example_tools` (OpenAI function schemas) are offered to the model when the box is ticked."""
        super().__init__(**kwargs)
        self.backend = backend
        self.example_tools = example_tools or None
        self.history: list[dict] = []

    def compose(self) -> ComposeResult:
        with Horizontal(id="chat-settings"):
            yield Label("system prompt")
            yield Input(placeholder="none", id="system")
            yield Label("temperature")
            yield Input("0.0", type="number", id="temperature")
            names = " and ".join(t["function"]["name"] for t in self.example_tools or ())
            yield Checkbox("example tools", id="tools", tooltip=f"offer {names or 'no tools'} to the model")
        yield VerticalScroll(id="conversation")
        yield Input(placeholder="Message the model: enter sends, esc stops, ctrl+l clears", id="prompt")

    @property
    def busy(self) -> bool:
        return any(w.group == "chat" and not w.is_finished for w in self.workers)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "prompt" and event.value.strip():
            self.send(event.value.strip())
            event.input.clear()

    def send(self, text: str) -> None:
        if self.busy:
            self.notify("Still answering: press esc to stop it first.", severity="warning")
            return
        try:
            temperature = float(self.query_one("#temperature", Input).value or 0)
        except ValueError:
            self.notify("The temperature must be a number.", severity="error")
            return
        self.history.append({"role": "user", "content": text})
        system = self.query_one("#system", Input).value.strip()
        request = GenerationRequest(
            messages=([{"role": "system", "content": system}] if system else []) + self.history,
            tools=self.example_tools if self.query_one("#tools", Checkbox).value else None,
            sampling=Sampling(temperature=temperature),
            source="chat",
            client=CLIENT,
        )
        self.reply(text, request)

    @work(exclusive=True, group="chat")
    async def reply(self, text: str, request: GenerationRequest) -> None:
        conversation = self.query_one("#conversation", VerticalScroll)
        history = self.history  # a clear starts a new one
        turn = AssistantTurn()
        await conversation.mount(UserTurn(text), turn)
        try:
            async with aclosing(self.backend.chat(request)) as events:
                async for event in events:
                    turn.add(event)
                    conversation.scroll_end(animate=False)
        except asyncio.CancelledError:
            turn.stopped()
            raise
        finally:
            if turn.failed or not turn.answered:
                history.pop()  # the question that got no answer
            else:
                history.append(turn.message())

    def action_stop(self) -> None:
        if self.busy:
            self.workers.cancel_group(self, "chat")
        else:
            self.query_one("#conversation").focus()

    def action_clear(self) -> None:
        self.workers.cancel_group(self, "chat")
        self.history = []
        self.query_one("#conversation").remove_children()
