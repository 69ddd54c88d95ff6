"""One engine worker process seen from the front process: spawn it, accept its connection, talk to it."""

import asyncio
import contextlib
import logging
import os
import pickle
import random
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.reduction import ForkingPickler
from typing import IO

from .config import EngineConfig, hostfile_hosts
from .protocol import Configure, FromWorker, ToWorker

log = logging.getLogger("mlx_tui.engine")


class WorkerProcess:
    """Spawns `python -m mlx_tui.engine.worker HOST:PORT` and connects to it.

    `on_message` is called on the event loop for each message the worker sends,
    `on_output(line)` for each line it writes to stderr, and `on_exit(code)` once,
    when the process has exited.
    """

    OUTPUT_GRACE_S = 2.0  # how long an exit waits for the rest of the worker's stderr

    def __init__(
        self,
        env: dict[str, str],
        on_message: Callable[[FromWorker], None],
        on_output: Callable[[str], None],
        on_exit: Callable[[int], None],
    ) -> None:
        self.env = env
        self.on_message = on_message
        self.on_output = on_output
        self.on_exit = on_exit
        self.process: subprocess.Popen[str] | None = None
        self.conn: WorkerConnection | None = None
        self.group = False
        self.address: tuple[str, int] | None = None  # where the worker connects back to, while it starts

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, config: EngineConfig) -> bool:
        """Spawn the worker and send it `config`; False if it exited before it connected."""
        loop = asyncio.get_running_loop()
        self.conn = None
        authkey = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        address = self.address = listener.address
        env = {**os.environ, **self.env, "MLX_TUI_AUTHKEY": authkey.hex()}
        command = [sys.executable, "-m", "mlx_tui.engine.worker", "{}:{}".format(*address)]
        self.group = is_group(config)
        if self.group:  # the key goes to rank 0 through mlx.launch's stdin, not on any command line
            del env["MLX_TUI_AUTHKEY"]
            command = launch_command(config, command + [config.backend], env)
        process = self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.PIPE if self.group else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=self.group,
        )
        if process.stdin:
            process.stdin.write(authkey.hex() + "\n")
            process.stdin.flush()
        relay = threading.Thread(target=self._relay_output, args=(loop, process.stderr), daemon=True)
        relay.start()
        accepted = threading.Event()
        watch = (loop, process, address, authkey, accepted, relay)
        threading.Thread(target=self._watch, args=watch, daemon=True).start()
        try:
            conn = await asyncio.to_thread(accept, listener)
        finally:
            accepted.set()
            listener.close()
            self.address = None
        if process.poll() is not None:
            conn.close()
            return False
        sock = socket.socket(fileno=os.dup(conn.fileno()))  # authenticated: from here on, read on the event loop
        conn.close()
        _, self.conn = await loop.connect_accepted_socket(lambda: WorkerConnection(self.on_message), sock)
        self.send(Configure(config))
        return True

    def send(self, message: ToWorker) -> None:
        if self.conn is not None:
            self.conn.send(message)  # once the worker is gone, nothing: its exit is reported through on_exit

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.group and self.process:
            kill_group(self.process.pid, sig)
        elif self.process and self.process.poll() is None:
            self.process.send_signal(sig)

    async def wait(self, timeout: float) -> int | None:
        if self.process is None:
            return None
        try:
            return await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            return None

    def _watch(
        self,
        loop: asyncio.AbstractEventLoop,
        process: subprocess.Popen[str],
        address: tuple[str, int],
        authkey: bytes,
        accepted: threading.Event,
        relay: threading.Thread,
    ) -> None:
        """Wait for the exit; wake the pending accept if the worker never connected.

        `on_exit` comes after the worker's last messages (such as why it could not load
        the model) and its last lines of output (such as mlx.launch's word on which rank
        ended), unless a stray process holds its stderr open.
        """
        code = process.wait()
        if self.group:
            kill_group(process.pid, signal.SIGKILL)  # no rank outlives mlx.launch
        if process.stdin:
            process.stdin.close()
        relay.join(self.OUTPUT_GRACE_S)
        if not accepted.is_set():
            try:
                Client(address, authkey=authkey).close()
            except OSError:
                pass
        try:
            asyncio.run_coroutine_threadsafe(self._exited(code), loop)
        except RuntimeError:
            pass  # the event loop has already closed

    async def _exited(self, code: int) -> None:
        """Report the exit once the worker's connection has ended: after every message it sent."""
        if self.conn is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.conn.closed), self.OUTPUT_GRACE_S)
        self.on_exit(code)

    def _relay_output(self, loop: asyncio.AbstractEventLoop, stream: IO[str]) -> None:
        try:
            for line in stream:
                loop.call_soon_threadsafe(self.on_output, line.rstrip("\n"))
        except RuntimeError:
            pass  # the event loop has already closed


class WorkerConnection(asyncio.Protocol):
    """The worker's socket on the event loop, in `multiprocessing.connection`'s framing (the worker's side).

    Each message is a pickle after its length (4 bytes, big-endian; -1 and then 8 bytes for 2 GiB
    or more). Messages are passed to `on_message` as they arrive, with no thread between the
    socket and the loop; `closed` is done once the connection has ended.
    """

    def __init__(self, on_message: Callable[[FromWorker], None]) -> None:
        self.on_message = on_message
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        start = 0
        while (message := self._message(start)) is not None:
            body, start = message
            try:
                self.on_message(pickle.loads(body))
            except Exception:  # one message's failure must not end the connection
                log.exception("handling a message from the worker failed")
        del self.buffer[:start]

    def _message(self, start: int) -> tuple[bytes, int] | None:
        """The body of the message at `start` in the buffer and where the next one starts, once it is all there."""
        if len(self.buffer) < start + 4:
            return None
        (size,) = struct.unpack_from("!i", self.buffer, start)
        header = 4
        if size == -1:
            if len(self.buffer) < start + 12:
                return None
            (size,) = struct.unpack_from("!Q", self.buffer, start + 4)
            header = 12
        end = start + header + size
        if len(self.buffer) < end:
            return None
        return bytes(self.buffer[start + header : end]), end

    def send(self, message: ToWorker) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        body = ForkingPickler.dumps(message)
        self.transport.write(struct.pack("!i", len(body)) + body)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def accept(listener: Listener) -> Connection:
    """The worker's connection; a stranger (a local process with the wrong key, or none) is refused."""
    while True:
        try:
            return listener.accept()
        except (AuthenticationError, EOFError, ConnectionError) as e:
            log.warning("refused a connection to the worker's listener: %s", e or type(e).__name__)


# `mlx.launch`, run by this interpreter (its module has no `python -m` entry point).
LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; sys.exit(main())"


def is_group(config: EngineConfig) -> bool:
    return config.ranks > 1 or config.hostfile is not None


def launch_command(config: EngineConfig, worker: list[str], env: dict[str, str]) -> list[str]:
    """`mlx.launch` starting `worker` on every rank: N ranks on 127.0.0.1, or the hostfile's hosts."""
    if config.hostfile:
        hosts = ["--hostfile", config.hostfile]
    else:
        hosts = ["--hosts", "127.0.0.1", "-n", str(config.ranks)]
        # the ranks share this machine's cores: they split the worker's OpenBLAS threads, since
        # threads that spin beyond the cores starve the other ranks
        threads = int(env.get("OPENBLAS_NUM_THREADS") or os.cpu_count() or 1)
        env["OPENBLAS_NUM_THREADS"] = str(max(1, threads // config.ranks))
    port = free_ports(len(hostfile_hosts(config.hostfile, config.backend)) if config.hostfile else config.ranks)
    options = [*hosts, "--backend", config.backend, "--starting-port", str(port)]
    return [sys.executable, "-c", LAUNCH, *options, "--", *worker]


def free_ports(n: int) -> int:
    """The first of `n` consecutive ports free on this machine, for the ring's listeners."""
    while True:
        start = random.randrange(20000, 60000 - n)
        try:
            for port in range(start, start + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
