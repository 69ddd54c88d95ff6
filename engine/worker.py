"""The engine worker: the one process where MLX runs.

Started as `python -m mlx_tui.engine.worker HOST:PORT` with the auth key in
`MLX_TUI_AUTHKEY`; it connects back to the front process, receives its settings,
loads the model and then serves requests until told to stop or disconnected.

Front to worker: ("config", EngineConfig), ("submit", rid, Request), ("cancel", rid),
("count", rid, Request), ("stats", rid), ("stop",).
Worker to front: ("progress", phase, fraction), ("ready", info), ("fatal", message),
("events", [(rid, event), ...]), ("reply", rid, value), ("failure", message) for a
failed batched step (the breaker counts it).
"""

import os
import queue
import sys
import threading
from pathlib import Path
from multiprocessing.connection import Client, Connection

from .config import EngineConfig
from .disk_cache import DiskCache
from .events import Error
from .loader import ModelError, load
from .prefix_cache import PrefixCache
from .scheduler import RequestError, Scheduler


def read_inbox(conn: Connection, inbox: queue.Queue):
    """Move messages from the socket to the queue; a lost connection means stop."""
    try:
        while True:
            inbox.put(conn.recv())
    except (EOFError, OSError):
        inbox.put(("stop",))


def serve(conn: Connection, scheduler: Scheduler):
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=read_inbox, args=(conn, inbox), daemon=True).start()
    while True:
        messages = [inbox.get()] if not scheduler.busy else []
        while not inbox.empty():
            messages.append(inbox.get_nowait())
        events = []
        for message in messages:
            if message[0] == "stop":
                return
            events += handle(message, scheduler, conn)
        if scheduler.busy:
            events += scheduler.step()
        while scheduler.failures:  # first, so the breaker has counted it before anyone sees the error
            conn.send(("failure", scheduler.failures.pop(0)))
        if events:
            conn.send(("events", events))


def handle(message: tuple, scheduler: Scheduler, conn: Connection) -> list:
    kind, rid, *rest = message
    if kind == "submit":
        return scheduler.submit(rid, rest[0])
    if kind == "cancel":
        scheduler.cancel(rid)
    elif kind == "count":
        try:
            conn.send(("reply", rid, scheduler.count_tokens(rest[0])))
        except RequestError as e:
            conn.send(("reply", rid, Error("invalid_request", str(e))))
    elif kind == "stats":
        conn.send(("reply", rid, scheduler.stats()))
    return []


def main(argv: list[str] = sys.argv[1:]) -> int:
    host, port = argv[0].rsplit(":", 1)
    authkey = bytes.fromhex(os.environ.pop("MLX_TUI_AUTHKEY"))
    conn = Client((host, int(port)), authkey=authkey)
    kind, config = conn.recv()
    assert kind == "config" and isinstance(config, EngineConfig)

    def progress(phase: str, fraction: float):
        conn.send(("progress", phase, fraction))

    try:
        loaded = load(config.model, progress, config.tool_parser, config.chat_template, config.dtype)
    except ModelError as e:
        conn.send(("fatal", str(e)))
        return 1
    disk = None
    if config.cache_dir:
        disk = DiskCache(Path(config.cache_dir) / loaded.identity, int(config.cache_disk_gb * 2**30), loaded.identity)
    scheduler = Scheduler(loaded, config, PrefixCache(config.cache_ram_bytes, disk))
    tokenizer = loaded.tokenizer
    conn.send(
        (
            "ready",
            {
                "pid": os.getpid(),
                "context_length": loaded.context_length,
                "dtype": loaded.dtype,
                "dtype_note": loaded.dtype_note,
                "tool_parser": scheduler.parser_name,
                "thinking": scheduler.think is not None,
                "eos": sorted(tokenizer.eos_token_ids),
            },
        )
    )
    serve(conn, scheduler)
    if disk:
        disk.flush()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown, which can hang on MLX's threads; the disk cache is flushed
