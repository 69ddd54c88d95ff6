"""`mlx-tui --serve`: the engine and the API on uvicorn, no dashboard (and no Textual), until a signal."""

import asyncio
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn

from mlx_tui.engine.client import EngineClient
from mlx_tui.engine.config import EngineConfig

from .connect import client_setup
from .embedded import ApiServer
from .server import create_app
from .startup import start_engine


class ProgressBar:
    """Prints model loading as a one-line progress bar on stderr."""

    def __init__(self) -> None:
        self.open = False

    def __call__(self, phase: str, fraction: float) -> None:
        filled = int(fraction * 30)
        sys.stderr.write(f"\rloading model: {phase:<8} [{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%}")
        self.open = not (phase == "weights" and fraction >= 1)
        if not self.open:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def close(self) -> None:
        """End the bar's line, so that what follows starts on a line of its own."""
        if self.open:
            sys.stderr.write("\n")
            self.open = False


def say(message: str) -> None:
    print(f"mlx-tui: {message}", file=sys.stderr)


async def serve(
    config: EngineConfig,
    sock: socket.socket,
    address: str,
    settings: dict[str, Any],
    grace: float,
    warm_file: Path | None = None,
) -> int:
    """Serve the API from `sock` (bound, shown as `address`) until SIGINT or SIGTERM; the exit code.

    `settings` go to `create_app`; running requests get `grace` seconds to finish on the first signal.
    """
    progress = ProgressBar()
    engine = EngineClient(config, on_progress=progress)

    def report(level: int, message: str) -> None:
        progress.close()
        say(message)

    if not await start_engine(engine, warm_file, report):
        return 1
    app = create_app(engine, **settings)
    server = ApiServer(app, sock, grace, log_config=uvicorn.config.LOGGING_CONFIG, log_level="info")
    dtype = ", ".join(filter(None, (engine.info["dtype"], engine.info["dtype_note"])))
    cache = engine.info["cache_mode"]
    speculation = engine.info["speculation"]
    say(
        f"serving {engine.config.model} at {address} (BLAS: {engine.blas}; dtype: {dtype}; prefix cache: {cache}; "
        f"speculation: {speculation}; stream interval: {engine.info['stream_interval_ms']} ms)"
    )
    print(client_setup(address, settings.get("api_key"), engine.info["context_length"]), file=sys.stderr)
    signalled = asyncio.Event()

    def on_signal() -> None:
        if signalled.is_set():  # a second one: end what still runs now
            asyncio.ensure_future(engine.drain(0))
        signalled.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    serving = server.start()
    waiting = asyncio.create_task(signalled.wait())
    try:
        await asyncio.wait([serving, waiting], return_when=asyncio.FIRST_COMPLETED)
        if signalled.is_set():
            say(f"stopping; running requests have {grace:g} s to finish (signal again to end them now)")
        await server.stop()
    finally:
        waiting.cancel()
        await engine.stop()
    return 0 if signalled.is_set() else 1
