"""uvicorn as a task of our event loop (the dashboard's, or --serve's): no signal handlers of its own."""

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette

log = logging.getLogger(__name__)


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT and SIGTERM to the app it runs in."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ApiServer:
    """Serves the API app on an already bound socket until `stop()`, which lets running requests finish.

    `grace` is how long running requests may take to finish once `stop()` is called;
    `settings` go to uvicorn (by default its logging is left to the app: the log pane).
    """

    GRACE_S = 2  # how long open streams (such as /v1/events) may take to finish once uvicorn stops

    def __init__(self, app: Starlette, sock: socket.socket, grace: float = 10.0, **settings: Any) -> None:
        settings = {"log_config": None, **settings}
        config = uvicorn.Config(app, timeout_graceful_shutdown=self.GRACE_S, **settings)
        self.server = EmbeddedServer(config)
        self.engine = app.state.engine
        self.sock = sock
        self.grace = grace
        self.task: asyncio.Task | None = None

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self._serve())
        return self.task

    async def _serve(self) -> None:
        try:
            await self.server.serve(sockets=[self.sock])
        except (Exception, SystemExit) as e:  # SystemExit: uvicorn's way to say it could not start
            log.error("the API server stopped: %r", e)

    async def stop(self) -> None:
        """Shut down gracefully: the engine refuses new requests and gives running ones `grace`
        seconds before it ends them with an error event; then uvicorn closes the socket and,
        after GRACE_S, cancels what is still open (an event stream).

        Not through `handle_exit`: sse-starlette hooks it to set a process-wide flag that is
        never reset and would end every later event stream in this process (and cut the
        running generations at once).
        """
        if self.task is None:
            return
        await self.engine.drain(self.grace)
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), self.GRACE_S + 3)
        except TimeoutError:
            self.server.force_exit = True
            self.task.cancel()
        self.sock.close()
