"""The engine worker: the one process where MLX runs.

Started as `python -m mlx_tui.engine.worker HOST:PORT [BACKEND]` with the auth key in
`MLX_TUI_AUTHKEY` (in a group: on the first line of stdin, which mlx.launch passes on);
it connects back to the front process, receives its settings, loads the model and then
serves requests until told to stop or disconnected.

Front to worker: ("config", EngineConfig), ("submit", rid, Request), ("cancel", rid),
("count", rid, Request), ("stats", rid), ("stop",).
Worker to front: ("progress", phase, fraction), ("ready", info), ("fatal", message),
("events", [(rid, event), ...]), ("reply", rid, value), ("failure", message) for a
failed batched step (the breaker counts it).

Started by `mlx.launch`, every rank runs this module: rank 0 connects back and serves,
the others follow the steps it shares (see `group.py`).
"""

import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from multiprocessing.connection import Client, Connection

from . import cache_kinds
from . import group as ranks
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


# The messages that change what the batch does; in a group every rank applies them.
STEP_MESSAGES = ("submit", "cancel", "stop")


def serve(conn: Connection, scheduler: Scheduler, group=None, clock: ranks.Clock | None = None):
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=read_inbox, args=(conn, inbox), daemon=True).start()
    while True:
        messages = [inbox.get()] if not scheduler.busy else []
        while not inbox.empty():
            messages.append(inbox.get_nowait())
        if group is not None:
            share_step(group, clock, messages, scheduler.busy)
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


def share_step(group, clock: ranks.Clock, messages: list, busy: bool):
    """Share the step's decisions and clock with the other ranks (queries are answered here alone)."""
    decisions = [m for m in messages if m[0] in STEP_MESSAGES]
    if decisions or busy:
        clock.now = time.monotonic()
        ranks.share(group, (clock.now, decisions))


def follow(scheduler: Scheduler, group, clock: ranks.Clock):
    """A rank other than 0: run the steps rank 0 shares, discarding the events (rank 0 sends them)."""
    while True:
        clock.now, decisions = ranks.share(group)
        for message in decisions:
            if message[0] == "stop":
                return
            handle(message, scheduler, None)
        if scheduler.busy:
            scheduler.step()
        scheduler.failures.clear()


def handle(message: tuple, scheduler: Scheduler, conn: Connection | None) -> list:
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
    # The front process decides when the worker stops ("stop", or its connection closing): a
    # Ctrl-C or SIGTERM sent to the whole process group must not cut the requests it lets finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    rank = ranks.launch_rank()
    conn = None
    if not rank:
        host, port = argv[0].rsplit(":", 1)
        authkey = bytes.fromhex(os.environ.pop("MLX_TUI_AUTHKEY", None) or sys.stdin.readline().strip())
        conn = Client((host, int(port)), authkey=authkey)
        kind, config = conn.recv()
        assert kind == "config" and isinstance(config, EngineConfig)
    group = None
    if rank is not None:
        on_timeout = (lambda: conn.send(("fatal", unmet(config)))) if conn else (lambda: None)
        group = ranks.init(argv[1], on_timeout)
        ranks.heartbeat(rank)
        config = ranks.share(group, config if conn else None)

    def progress(phase: str, fraction: float):
        if conn:
            conn.send(("progress", phase, fraction))

    try:
        loaded = load(
            config.model, progress, config.tool_parser, config.chat_template,
            group=group, shard=config.shard, dtype=config.dtype,
        )
        if why := cache_kinds.unbatchable(loaded.model):
            raise ModelError(f"{config.model}: {why}, so mlx-tui cannot serve it")
    except ModelError as e:
        if conn:
            conn.send(("fatal", str(e)))
        else:
            print(f"rank {rank}: {e}", file=sys.stderr)
        return 1
    disk = None
    if config.cache_dir:
        where = (Path(config.cache_dir) / loaded.identity, int(config.cache_disk_gb * 2**30), loaded.identity)
        disk = ranks.GroupDiskCache(group, *where) if group else DiskCache(*where)
    clock = ranks.Clock() if group else time.monotonic
    per_token = cache_kinds.kv_bytes_per_token(loaded.model)
    if group:
        per_token = ranks.whole(group, per_token)  # the whole model's, the same on every rank
        cache = PrefixCache(ranks.cache_budget(group, config.cache_ram_bytes, per_token), disk, clock, per_token)
    else:
        cache = PrefixCache(config.cache_ram_bytes, disk, clock)
    scheduler = Scheduler(loaded, config, cache, per_token)
    members = {}
    if group is not None:
        ranks.seed(group)
        members = {"ranks": ranks.gather(group, ranks.describe(group)), "shard": loaded.shard}
    if conn is None:
        follow(scheduler, group, clock)
        if disk:
            disk.flush()
        return 0
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
                "cache_mode": scheduler.cache_mode,
                "thinking": scheduler.think is not None,
                "eos": sorted(tokenizer.eos_token_ids),
                **members,
            },
        )
    )
    serve(conn, scheduler, group, clock)
    if disk:
        disk.flush()
    return 0


def unmet(config: EngineConfig) -> str:
    hosts = f"the hosts in {config.hostfile}" if config.hostfile else f"{config.ranks} local ranks"
    return f"the ranks did not all connect within {ranks.CONNECT_TIMEOUT:g} s ({hosts}): is every host reachable?"


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown, which can hang on MLX's threads; the disk cache is flushed
