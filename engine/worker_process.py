"""One engine worker process seen from the front process: spawn it, accept its connection, talk to it."""

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Client, Listener

from .config import EngineConfig


class WorkerProcess:
    """Spawns `python -m mlx_tui.engine.worker HOST:PORT` and connects to it.

    `on_message` is called on the event loop for each message the worker sends,
    `on_output(line)` for each line it writes to stderr, and `on_exit(code)` once,
    when the process has exited.
    """

    def __init__(
        self,
        env: dict[str, str],
        on_message: Callable[[tuple], None],
        on_output: Callable[[str], None],
        on_exit: Callable[[int], None],
    ):
        self.env = env
        self.on_message = on_message
        self.on_output = on_output
        self.on_exit = on_exit
        self.process: subprocess.Popen | None = None
        self.conn = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, config: EngineConfig) -> bool:
        """Spawn the worker and send it `config`; False if it exited before it connected."""
        loop = asyncio.get_running_loop()
        authkey = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        address = listener.address
        env = {**os.environ, **self.env, "MLX_TUI_AUTHKEY": authkey.hex()}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlx_tui.engine.worker", "%s:%d" % address],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        threading.Thread(target=self._relay_output, args=(loop, self.process.stderr), daemon=True).start()
        accepted = threading.Event()
        threading.Thread(target=self._watch, args=(loop, address, authkey, accepted), daemon=True).start()
        try:
            conn = await asyncio.to_thread(listener.accept)
        finally:
            accepted.set()
            listener.close()
        if self.process.poll() is not None:
            conn.close()
            return False
        self.conn = conn
        self.send(("config", config))
        threading.Thread(target=self._read, args=(loop, conn), daemon=True).start()
        return True

    def send(self, message: tuple):
        try:
            if self.conn is not None:
                self.conn.send(message)
        except OSError:
            pass  # the worker is gone; its exit is reported through on_exit

    def kill(self, sig: int = signal.SIGKILL):
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)

    async def wait(self, timeout: float) -> int | None:
        try:
            return await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            return None

    def _watch(self, loop, address, authkey: bytes, accepted: threading.Event):
        """Wait for the exit; wake the pending accept if the worker never connected."""
        code = self.process.wait()
        if not accepted.is_set():
            try:
                Client(address, authkey=authkey).close()
            except OSError:
                pass
        try:
            loop.call_soon_threadsafe(self.on_exit, code)
        except RuntimeError:
            pass  # the event loop has already closed

    def _relay_output(self, loop, stream):
        try:
            for line in stream:
                loop.call_soon_threadsafe(self.on_output, line.rstrip("\n"))
        except RuntimeError:
            pass  # the event loop has already closed

    def _read(self, loop, conn):
        try:
            while True:
                message = conn.recv()
                loop.call_soon_threadsafe(self.on_message, message)
        except (EOFError, OSError, RuntimeError):
            pass  # the worker or the event loop is gone
