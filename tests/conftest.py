"""Shared fixtures: one engine on the demo model, and one API server on a loopback port, for the whole session.

Both live on one event loop in a background thread; tests reach the engine with
`loop.run(coro)` and the server with real HTTP clients at `server.url`.
"""

import asyncio
import os
import socket
import threading
from collections.abc import Coroutine
from pathlib import Path

import pytest
import uvicorn
from tokenizers import Tokenizer

from mlx_tui.engine.client import EngineClient
from mlx_tui.engine.config import EngineConfig
from mlx_tui.engine.demo import MODEL_DIR

# a request in the shape of Claude Code's first turn, written for the tests (none of the client's prompt text)
CLAUDE_CODE_SAMPLE = Path(__file__).parent / "fixtures" / "claude-code-first-turn.json"


def skip_unless_ci(reason: str):
    """Skip, saying why; under CI (`CI=true`), where everything a test needs is installed, fail instead."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason}, and CI must run this test (.ci/run installs what it needs)")
    pytest.skip(reason)


class LoopThread:
    """An asyncio loop running in a daemon thread; `run` waits for a coroutine on it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro: Coroutine, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        """Cancel what still runs on the loop (such as sse-starlette's shutdown watcher), then stop it."""
        self.run(self._cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)

    @staticmethod
    async def _cancel_the_rest():
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn server for `app` on a free loopback port, run on `loop`."""

    def __init__(self, loop: LoopThread, app):
        self.loop = loop
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.uvicorn = uvicorn.Server(config)
        self.task = asyncio.run_coroutine_threadsafe(self.uvicorn.serve(), loop.loop)
        loop.run(self._started())

    async def _started(self):
        while not self.uvicorn.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.02)

    def close(self):
        self.uvicorn.should_exit = True
        self.task.result(30)


@pytest.fixture(scope="session")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


def letter_token() -> int:
    """The demo model's token for "a": forced with a logit bias, it makes a generation that never ends."""
    return Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json")).token_to_id("a")


def start_engine(loop: LoopThread, **settings) -> EngineClient:
    """A started engine; transcripts and the prefix cache stay in memory unless their directories are given."""
    engine = EngineClient(EngineConfig(**{"transcripts_dir": None, "cache_dir": None, **settings}))
    loop.run(engine.start())
    return engine


@pytest.fixture
def make_engine(loop):
    """Start engines with their own settings for one test (to break or reconfigure); stopped after it."""
    engines = []

    def make(**settings) -> EngineClient:
        engines.append(start_engine(loop, **settings))
        return engines[-1]

    yield make
    for engine in engines:
        loop.run(engine.stop())


@pytest.fixture(scope="session")
def engine(loop):
    """The shared engine on the demo model; tests that break or reconfigure it start their own."""
    engine = start_engine(loop)
    yield engine
    loop.run(engine.stop())


@pytest.fixture(scope="session")
def server(loop, engine):
    """The shared API server on the shared engine."""
    from mlx_tui.api.server import create_app

    server = Server(loop, create_app(engine))
    yield server
    server.close()


def tokens_until(loop: LoopThread, engine: EngineClient, conversation: dict, marker: str) -> int:
    """How many tokens the demo model generates (greedy, thinking off) for a demo conversation until its raw text
    holds `marker`."""
    from mlx_tui.engine.events import RawText
    from mlx_tui.engine.request import GenerationRequest

    async def raw_pieces():
        request = GenerationRequest(conversation["messages"][:-1], tools=conversation["tools"], enable_thinking=False)
        return [e.text async for e in engine.generate(request) if isinstance(e, RawText)]

    raw = ""
    for count, piece in enumerate(loop.run(raw_pieces()), 1):
        raw += piece
        if marker in raw:
            return count
    raise AssertionError(f"{marker!r} was never generated")
