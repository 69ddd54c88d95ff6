"""The front process's handle on the engine worker: start and supervise it, stream requests through it."""

import asyncio
import itertools
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Client, Listener

from .blas import worker_blas
from .config import EngineConfig
from .events import TERMINAL, Error, Event
from .request import Request


class EngineUnavailable(Exception):
    """The worker is not ready to take requests (loading, restarting or failed)."""


class ModelLoadError(Exception):
    """The worker could not load the model; the message is one line."""


class EngineClient:
    """Starts the worker, restarts it when it dies, and streams events per request.

    `on_progress(phase, fraction)` is called while the model loads.
    """

    RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)

    def __init__(self, config: EngineConfig, on_progress: Callable[[str, float], None] | None = None):
        self.config = config
        self.on_progress = on_progress or (lambda phase, fraction: None)
        self.state = "stopped"
        self.info: dict = {}
        self.restarts = 0
        self.blas, self._blas_env = worker_blas(config.blas)
        self._ids = itertools.count()
        self._streams: dict[int, asyncio.Queue] = {}
        self._replies: dict[int, asyncio.Future] = {}
        self._process: subprocess.Popen | None = None
        self._conn = None
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._fatal: str | None = None
        self._supervisor: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self):
        """Start the worker and wait until its model is loaded."""
        self._loop = asyncio.get_running_loop()
        await self._launch()
        if self._fatal:
            raise ModelLoadError(self._fatal)
        self._supervisor = asyncio.create_task(self._supervise())

    async def stop(self):
        self.state = "stopped"
        if self._supervisor:
            self._supervisor.cancel()
        self._send(("stop",))
        if self._process:
            try:
                await asyncio.to_thread(self._process.wait, 10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                await asyncio.to_thread(self._process.wait)
        self._fail_in_flight("the engine stopped")

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        """The request's events, ending with Done or Error; leaving early cancels it."""
        if self.state != "ready":
            raise EngineUnavailable(f"the engine is {self.state}")
        rid = next(self._ids)
        events: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = events
        finished = False
        try:
            self._send(("submit", rid, request))
            while not finished:
                event = await events.get()
                finished = isinstance(event, TERMINAL)
                yield event
        finally:
            del self._streams[rid]
            if not finished:
                self._send(("cancel", rid))

    async def count_tokens(self, request: Request) -> int | Error:
        return await self._call("count", request)

    async def stats(self) -> dict:
        return await self._call("stats")

    async def _call(self, kind: str, *args):
        if self.state != "ready":
            raise EngineUnavailable(f"the engine is {self.state}")
        rid = next(self._ids)
        reply = self._replies[rid] = self._loop.create_future()
        try:
            self._send((kind, rid, *args))
            return await reply
        finally:
            del self._replies[rid]

    async def _launch(self):
        self.state = "loading"
        self._ready.clear()
        self._lost.clear()
        self._fatal = None
        authkey = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        host, port = listener.address
        env = {**os.environ, **self._blas_env, "MLX_TUI_AUTHKEY": authkey.hex()}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "mlx_tui.engine.worker", f"{host}:{port}"], env=env
        )
        process = self._process
        accepted = threading.Event()
        threading.Thread(target=self._watch, args=(process, (host, port), authkey, accepted), daemon=True).start()
        try:
            self._conn = await asyncio.to_thread(listener.accept)
        finally:
            accepted.set()
            listener.close()
        if process.poll() is not None:
            self._fatal = self._fatal or f"the engine worker exited with code {process.returncode}"
            self.state = "failed"
            return
        self._conn.send(("config", self.config))
        threading.Thread(target=self._read, args=(self._conn,), daemon=True).start()
        await asyncio.wait(
            [asyncio.ensure_future(self._ready.wait()), asyncio.ensure_future(self._lost.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not self._ready.is_set():
            self._fatal = self._fatal or f"the engine worker exited with code {process.wait()}"
            self.state = "failed"

    def _watch(self, process: subprocess.Popen, address: tuple, authkey: bytes, accepted: threading.Event):
        """Wait for the worker's exit; wake the pending accept if it never connected."""
        process.wait()
        if not accepted.is_set():
            try:
                Client(address, authkey=authkey).close()
            except OSError:
                pass
        try:
            self._loop.call_soon_threadsafe(self._lost.set)
        except RuntimeError:
            pass  # the event loop has already closed

    def _read(self, conn):
        try:
            while True:
                message = conn.recv()
                self._loop.call_soon_threadsafe(self._dispatch, message)
        except (EOFError, OSError, RuntimeError):
            pass  # the worker or the event loop is gone

    def _dispatch(self, message: tuple):
        kind = message[0]
        if kind == "events":
            for rid, event in message[1]:
                if stream := self._streams.get(rid):
                    stream.put_nowait(event)
        elif kind == "reply":
            if (reply := self._replies.get(message[1])) and not reply.done():
                reply.set_result(message[2])
        elif kind == "progress":
            self.on_progress(message[1], message[2])
        elif kind == "ready":
            self.info = message[1]
            self.state = "ready"
            self._ready.set()
        elif kind == "fatal":
            self._fatal = message[1]

    def _send(self, message: tuple):
        try:
            if self._conn is not None:
                self._conn.send(message)
        except OSError:
            pass  # the worker is gone; the supervisor fails the request

    def _fail_in_flight(self, message: str):
        for stream in self._streams.values():
            stream.put_nowait(Error("engine", message))
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(EngineUnavailable(message))

    async def _supervise(self):
        """Restart the worker whenever it exits, failing what was in flight."""
        failures = 0
        while True:
            await self._lost.wait()
            code = self._process.wait()
            self.state = "restarting"
            self._fail_in_flight(f"the engine worker exited (code {code}); restarting it")
            delay = self.RESTART_BACKOFF[min(failures, len(self.RESTART_BACKOFF) - 1)]
            await asyncio.sleep(delay)
            self.restarts += 1
            await self._launch()
            failures = failures + 1 if self._fatal else 0
