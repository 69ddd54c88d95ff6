"""uvicorn as a task of the dashboard's event loop: no signal handlers of its own, logs to the log pane."""

import asyncio
import contextlib
import logging
import socket

import uvicorn

log = logging.getLogger(__name__)


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT and SIGTERM to the app it runs in."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class ApiServer:
    """Serves an ASGI app on an already bound socket until `stop()`."""

    GRACE_S = 2.0  # how long open streams (such as /v1/events) may take to finish on shutdown

    def __init__(self, app, sock: socket.socket):
        config = uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=self.GRACE_S)
        self.server = EmbeddedServer(config)
        self.sock = sock
        self.task: asyncio.Task | None = None

    def start(self):
        self.task = asyncio.create_task(self._serve())

    async def _serve(self):
        try:
            await self.server.serve(sockets=[self.sock])
        except (Exception, SystemExit) as e:  # SystemExit: uvicorn's way to say it could not start
            log.error("the API server stopped: %r", e)

    async def stop(self):
        """Ask uvicorn to finish; it cancels what is still open (an event stream) after the grace period.

        Not through `handle_exit`: sse-starlette hooks it to set a process-wide flag that is
        never reset and would end every later event stream in this process.
        """
        if self.task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), self.GRACE_S + 3)
        except TimeoutError:
            self.server.force_exit = True
            self.task.cancel()
        self.sock.close()
