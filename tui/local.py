"""The dashboard's source in this process: the engine it starts and the API it serves from the app's event loop."""

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mlx_tui.api.embedded import ApiServer
from mlx_tui.api.startup import start_engine
from mlx_tui.engine.bus import WorkerChange
from mlx_tui.engine.client import EngineClient, EngineUnavailable
from mlx_tui.engine.events import Error, Event, TextDelta, ToolCallEnd
from mlx_tui.engine.request import GenerationRequest

from .state import DashboardEvent, Info

log = logging.getLogger(__name__)


class LocalBackend:
    """Starts the engine (and the API server, if there is one) and reads the engine's bus directly."""

    def __init__(
        self,
        engine: EngineClient,
        server: ApiServer | None = None,
        address: str = "",
        problem: str | None = None,
        warm_file: Path | None = None,
    ) -> None:
        """`problem` says why there is no server (a busy port, say); `warm_file` is prefilled once loaded."""
        self.engine = engine
        self.warm_file = warm_file
        self.server = server
        self.address = address
        self.problem = problem
        self._loading: asyncio.Task | None = None

    def start(self) -> None:
        """Serve the API at once (it answers "loading" meanwhile) and load the model in the background."""
        if self.server:
            self.server.start()
            log.info("serving the API at %s", self.address)
        if self.problem:
            log.error("the API is not served: %s", self.problem)
        self._loading = asyncio.create_task(self._load())

    async def _load(self) -> None:
        await start_engine(self.engine, self.warm_file, log.log)

    async def stop(self) -> None:
        if self._loading and not self._loading.done():
            self._loading.cancel()
        if self.server:
            await self.server.stop()
        await self.engine.stop()

    def _info(self) -> Info:
        engine = self.engine
        return Info(
            values={
                "model": engine.model_name,
                "address": self.address,
                "api_problem": self.problem,
                "started_at": engine.started_at,
                "blas": engine.blas,
                **engine.info,
            }
        )

    async def events(self) -> AsyncIterator[DashboardEvent]:
        yield self._info()
        async for event in self.engine.bus.subscribe(replay=True):
            yield event
            if isinstance(event, WorkerChange) and event.state == "ready":
                yield self._info()

    async def chat(self, request: GenerationRequest) -> AsyncGenerator[Event, None]:
        """The request's events, recorded as a transcript like an API request's."""
        id = f"chat_{secrets.token_hex(6)}"
        transcripts = self.engine.transcripts
        transcript = transcripts.open(id, request.source, request.client, received=asdict(request))
        reply: dict[str, Any] = {"content": "", "tool_calls": []}  # what the chat shows, recorded as what was sent back
        try:
            async with aclosing(self.engine.generate(request, id, transcript)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        reply["content"] += event.text
                    elif isinstance(event, ToolCallEnd):
                        reply["tool_calls"].append({"name": event.name, "arguments": event.arguments})
                    yield event
        except EngineUnavailable as e:
            yield Error("engine", str(e))
        finally:
            transcripts.sent(transcript, json.dumps(reply, ensure_ascii=False))
            transcripts.finish(transcript)

    async def transcript(self, id: str) -> dict | None:
        t = self.engine.transcripts.items.get(id)
        return asdict(t) if t else None
