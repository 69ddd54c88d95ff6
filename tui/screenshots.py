"""Drive a real session on the demo model and save a PNG of each screen: `python -m mlx_tui.tui.screenshots [DIR]`.

Textual saves SVG; `rsvg-convert` turns it into PNG (told to keep whitespace, which it
would otherwise collapse at the start of a styled span).
"""

import asyncio
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx
from textual.pilot import Pilot
from textual.widgets import DataTable

from mlx_tui.api.embedded import ApiServer
from mlx_tui.api.server import create_app
from mlx_tui.engine.client import EngineClient
from mlx_tui.engine.config import EngineConfig
from mlx_tui.engine.demo.conversations import TOOLS

from .app import MlxTui
from .chat import ChatView
from .cli import bind, url
from .local import LocalBackend

SIZE = (140, 42)
ANTHROPIC_TOOLS = [
    {"name": f["name"], "description": f["description"], "input_schema": f["parameters"]}
    for f in (t["function"] for t in TOOLS)
]
HEADERS = {"user-agent": "claude-cli/2.1.33 (external, cli)", "anthropic-version": "2023-06-01"}


def png(app: MlxTui, path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        svg = Path(tmp) / "screen.svg"
        svg.write_text(app.export_screenshot().replace("<svg ", '<svg xml:space="preserve" ', 1), encoding="utf-8")
        subprocess.run(["rsvg-convert", str(svg), "-o", str(path)], check=True)
    print(f"wrote {path}", file=sys.stderr)


async def until(pilot: Pilot, condition: Callable[[], bool], timeout: float = 120) -> None:
    for _ in range(int(timeout / 0.1)):
        if condition():
            return
        await pilot.pause(0.1)
    raise TimeoutError("the session did not reach the expected state")


async def next_tick(pilot: Pilot) -> None:
    """Wait for the engine's next stats event."""
    samples = cast(MlxTui, pilot.app).state.decode_tps
    seen = len(samples)
    await until(pilot, lambda: len(samples) > seen)


async def ask(pilot: Pilot, question: str) -> None:
    """Send `question` in the chat and wait for the whole answer."""
    chat = pilot.app.query_one(ChatView)
    turns = len(chat.history) + 2
    await pilot.click("#prompt")
    await pilot.press(*question, "enter")
    await until(pilot, lambda: len(chat.history) == turns)
    await pilot.pause()


async def api_traffic(address: str, scripted: int) -> None:
    """What a coding agent would send (a tool call, then its answer), and `scripted` short questions."""
    async with httpx.AsyncClient(base_url=address, timeout=120, headers=HEADERS) as http:
        question = {"role": "user", "content": "What is the weather in Paris?"}
        body: dict[str, Any] = {
            "model": "claude-sonnet-4",
            "max_tokens": 256,
            "messages": [question],
            "tools": ANTHROPIC_TOOLS,
        }
        call = (await http.post("/v1/messages", json=body)).json()
        tool_use = next(b for b in call["content"] if b["type"] == "tool_use")
        answer = {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": tool_use["id"],
                    "content": '{"city": "Paris", "temperature_c": 18, "condition": "sunny"}',
                }
            ],
        }
        body["messages"] += [{"role": "assistant", "content": call["content"]}, answer]
        await http.post("/v1/messages", json=body)
        plain = {"model": "gpt-4o", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        for _ in range(scripted):
            await http.post("/v1/chat/completions", json=plain, headers={"user-agent": "OpenAI/Python 1.99.0"})


async def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    engine = EngineClient(EngineConfig(transcripts_dir=None))
    sock = bind("127.0.0.1", 0)
    address = url(*sock.getsockname()[:2])
    backend = LocalBackend(engine, ApiServer(create_app(engine), sock), address)
    app = MlxTui(backend, example_tools=TOOLS)
    try:
        async with app.run_test(size=SIZE) as pilot:
            for second in range(8):  # a few seconds of varying traffic, so the charts have something to show
                await next_tick(pilot)
                await api_traffic(address, 1 + second % 4)
            await next_tick(pilot)
            app.flush(now=True)  # the dashboard draws what streams once a second: draw the last of it now
            await pilot.pause()
            png(app, out / "dashboard.png")

            await pilot.press("2")
            for question in ("Is 17 a prime number?", "And 18?"):
                await ask(pilot, question)
            await pilot.click("#reasoning")  # the first answer's; the second's stays collapsed
            await pilot.pause()
            png(app, out / "chat.png")

            await pilot.press("ctrl+l")
            await pilot.click("#tools")
            await ask(pilot, "What are the weather and the time in Berlin?")
            png(app, out / "chat-tools.png")

            await pilot.press("escape", "3")
            await until(
                pilot, lambda: app.query_one("#transcript-list", DataTable).row_count == len(app.state.transcripts)
            )
            await pilot.pause(0.5)
            png(app, out / "transcripts.png")

            await pilot.press("4")
            await pilot.pause()
            png(app, out / "log.png")

            await pilot.press("1", "question_mark")
            await pilot.pause()
            png(app, out / "help.png")
    finally:
        await backend.stop()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1] if len(sys.argv) > 1 else "screenshots")))
