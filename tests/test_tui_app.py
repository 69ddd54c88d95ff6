"""The dashboard on the real engine and demo model: in this process (API served from the app's loop) and attached."""

import asyncio
import io
import time

import httpx
import pytest
from rich.console import Console

from mlx_tui.api.embedded import ApiServer
from mlx_tui.api.server import create_app
from mlx_tui.engine.bus import StatsTick, TranscriptStep
from mlx_tui.engine.client import EngineClient
from mlx_tui.engine.config import EngineConfig
from mlx_tui.engine.demo.conversations import CONVERSATIONS
from mlx_tui.engine.events import (
    Done,
    ParseError,
    Started,
    TextDelta,
    Timings,
    ToolCallAbandoned,
    ToolCallDelta,
    ToolCallStart,
    Usage,
)
from mlx_tui.tui.app import MlxTui
from mlx_tui.tui.chat import ChatView
from mlx_tui.tui.cli import bind, url
from mlx_tui.tui.local import LocalBackend
from mlx_tui.tui.remote import RemoteBackend
from mlx_tui.tui.requests import RequestsTable

pytestmark = pytest.mark.asyncio

BY_NAME = {c["name"]: c for c in CONVERSATIONS}
SIZE = (140, 42)


def openai_body(name: str) -> dict:
    """A demo conversation as a Chat Completions request, without the reply."""
    conversation = BY_NAME[name]
    return {"model": "demo", "messages": conversation["messages"][:-1], "tools": conversation["tools"]}


def shown(app: MlxTui, selector: str) -> str:
    """The plain text a Static shows."""
    console = Console(width=200, file=io.StringIO())
    console.print(app.query_one(selector).content)
    return console.file.getvalue()


def cell(table: RequestsTable, id: str, column: str) -> str:
    return str(table.get_cell(id, column))


async def until(pilot, condition, timeout: float = 30):
    """Let the app run until `condition()` holds."""
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"still not true after {timeout} s: {condition.__code__.co_names}")


async def ready(pilot):
    """Wait for the model; fail at once, with the reason, if it cannot load."""
    worker = pilot.app.state.worker
    await until(pilot, lambda: worker.state in ("ready", "failed"))
    assert worker.state == "ready", worker.message


async def a_tool_call_through_the_api(pilot, address: str) -> str:
    """Ask for the weather in Paris over HTTP; the dashboard and the transcripts must show the call."""
    app = pilot.app
    async with httpx.AsyncClient(base_url=address, timeout=60) as http:
        response = await http.post("/v1/chat/completions", json=openai_body("weather_paris"))
    reply = response.json()
    assert reply["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    id = reply["id"]

    table = app.query_one(RequestsTable)
    await until(
        pilot,
        lambda: id in table.rows and cell(table, id, "result") == "tool_calls" and cell(table, id, "tools") == "1",
    )
    assert int(cell(table, id, "prompt")) > 0 and cell(table, id, "state") == "done"
    done = sum(r.phase == "done" for r in app.state.requests.values())
    await until(pilot, lambda: f"{done} done" in shown(app, "#latency"))
    assert app.state.ttft_p50 is not None

    await pilot.press("3")
    await until(pilot, lambda: "get_weather" in shown(app, "#section-calls"))
    assert '"city": "Paris"' in shown(app, "#section-calls")
    assert "<tool_call>" in shown(app, "#section-raw")
    return id


async def read_events(address: str, opened: asyncio.Event):
    """Hold a `/v1/events` stream open, as an attached dashboard does."""
    async with httpx.AsyncClient(base_url=address, timeout=None) as http:
        async with http.stream("GET", "/v1/events") as response:
            assert response.status_code == 200
            opened.set()
            async for _ in response.aiter_lines():
                pass


async def test_in_process_dashboard_transcripts_and_chat():
    engine = EngineClient(EngineConfig(transcripts_dir=None))
    sock = bind("127.0.0.1", 0)
    address = url(*sock.getsockname()[:2])
    backend = LocalBackend(engine, ApiServer(create_app(engine), sock), address)
    app = MlxTui(backend)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            assert address in shown(app, "#engine-info")
            assert "mlx-tui-demo" in shown(app, "#engine-info")
            await a_tool_call_through_the_api(pilot, address)

            chat = app.query_one(ChatView)
            await pilot.press("2", *"What is the capital of France?", "enter")
            await until(pilot, lambda: not chat.busy and len(chat.history) == 2)
            assert chat.history[-1]["content"] == "The capital of France is Paris."
            chat_id = next(id for id, t in app.state.transcripts.items() if t.source == "chat")
            recent = engine.bus.recent
            pieces = [e for e in recent if isinstance(e, TranscriptStep) and e.id == chat_id and e.step == "raw"]
            assert len(pieces) > 1, "the reply came in one piece, not streamed"
            table = app.query_one(RequestsTable)
            assert chat_id not in table.rows, "the hidden dashboard drew"
            await pilot.press(
                "escape", "1"
            )  # leave the prompt, show the dashboard: a hidden view catches up when shown
            await until(pilot, lambda: chat_id in table.rows)

            opened = asyncio.Event()
            stream = asyncio.create_task(read_events(address, opened))
            await asyncio.wait_for(opened.wait(), 10)
    finally:
        quitting = time.monotonic()
        await backend.stop()
    assert time.monotonic() - quitting < ApiServer.GRACE_S + 3, "an open event stream held up quitting"
    await asyncio.gather(stream, return_exceptions=True)


async def test_attached_to_a_server_shows_its_requests(server):
    backend = RemoteBackend(server.url)
    app = MlxTui(backend)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.state.connection is not None and app.state.connection.state == "connected")
            await ready(pilot)
            await a_tool_call_through_the_api(pilot, server.url)

            chat = app.query_one(ChatView)
            await pilot.press("2", *"Good morning!", "enter")
            await until(pilot, lambda: not chat.busy and len(chat.history) == 2)
            assert chat.history[-1]["content"] == "Good morning! How can I help you today?"
    finally:
        await backend.stop()


async def test_attach_shows_an_unreachable_server():
    sock = bind("127.0.0.1", 0)  # bound, never listening: connections are refused
    backend = RemoteBackend(url(*sock.getsockname()[:2]))
    app = MlxTui(backend)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.state.connection is not None and app.state.connection.state == "unreachable")
            await until(pilot, lambda: "unreachable" in shown(app, "#engine-info"))
    finally:
        await backend.stop()
        sock.close()


class Gated:
    """A backend whose chat reply streams one word each time the test opens the gate."""

    address = ""

    def __init__(self):
        self.gate = asyncio.Queue()

    def start(self):
        pass

    async def stop(self):
        pass

    async def events(self):
        await asyncio.Event().wait()
        yield {}

    async def chat(self, request):
        yield Started(5, 0)
        for word in ("Paris ", "is ", "sunny."):
            await self.gate.get()
            yield TextDelta(word)
        await self.gate.get()
        yield Done("end", Usage(5, 0, 3), Timings(0.0, 0.1, 0.2))

    async def transcript(self, id):
        return None


async def test_the_chat_shows_the_reply_while_it_streams():
    backend = Gated()
    app = MlxTui(backend)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2", *"Weather?", "enter")
        backend.gate.put_nowait(None)
        await until(pilot, lambda: "Paris" in shown(app, "#reply"))
        assert "writing" in shown(app, "#status")
        backend.gate.put_nowait(None)
        await until(pilot, lambda: "Paris is" in shown(app, "#reply"))
        backend.gate.put_nowait(None)
        backend.gate.put_nowait(None)
        await until(pilot, lambda: "end · 3 tokens" in shown(app, "#status"))
        assert "Paris is sunny." in shown(app, "#reply")


class CutOff(Gated):
    """A backend whose chat reply is a tool call cut off by max_tokens inside its arguments."""

    async def chat(self, request):
        yield Started(5, 0)
        yield ToolCallStart(0, "call_1", "get_weather")
        yield ToolCallDelta(0, '{"city": "Pa')
        yield ParseError(
            "the reply ended inside a tool call", '<tool_call>{"name": "get_weather", "arguments": {"city": "Pa'
        )
        yield ToolCallAbandoned(0, "call_1", '"}')
        yield Done("length", Usage(5, 0, 9), Timings(0.0, 0.1, 0.2))


async def test_the_chat_marks_an_abandoned_tool_call():
    app = MlxTui(CutOff())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2", *"Weather?", "enter")
        await until(pilot, lambda: "length" in shown(app, "#status"))
        card = app.query_one("ToolCallCard")
        assert "abandoned" in card.border_title
        assert '"city": "Pa' in shown(app, "ToolCallCard")
        assert "tool_calls" not in app.query_one("AssistantTurn").message()


class DiskFailing(Gated):
    """A backend whose engine reports a disk tier that failed to write."""

    async def events(self):
        cache = {"disk_budget": 2**30, "disk_bytes": 0, "disk_write_errors": 2, "disk_dropped": 1, "disk_rejected": 0}
        yield StatsTick(values={"cache": cache})
        await asyncio.Event().wait()


async def test_the_cache_panel_shows_the_disk_tiers_failures():
    app = MlxTui(DiskFailing())
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "disk errors" in shown(app, "#cache"))
        assert "2 failed writes · 1 dropped" in shown(app, "#cache")
        assert "refused" not in shown(app, "#cache")
