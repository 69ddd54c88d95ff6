"""The engine worker: the one process where MLX runs.

Started as `python -m mlx_tui.engine.worker HOST:PORT [BACKEND]` with the auth key in
`MLX_TUI_AUTHKEY` (in a group: on the first line of stdin, which mlx.launch passes on);
it connects back to the front process, receives its settings, loads the model and then
serves requests until told to stop or disconnected. The messages are in `protocol.py`.

Started by `mlx.launch`, every rank runs this module: rank 0 connects back and serves,
the others follow the steps it shares (see `group.py`).
"""

import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.core.distributed import Group

from . import cache_kinds, faults, pacing
from . import group as ranks
from .config import EngineConfig, stream_interval_ms
from .disk_cache import DiskCache
from .events import Error
from .loader import Loaded, ModelError, load
from .prefix_cache import PrefixCache
from .protocol import (
    STEP_MESSAGES,
    Cancel,
    Configure,
    CountTokens,
    Events,
    Fatal,
    GetStats,
    LoadProgress,
    Ready,
    Reply,
    Step,
    StepFailed,
    Stop,
    Submit,
    ToWorker,
    Working,
)
from .scheduler import RequestError, Scheduler, Tagged


def read_inbox(conn: Connection, inbox: queue.Queue) -> None:
    """Move messages from the socket to the queue; a lost connection means stop."""
    try:
        while True:
            inbox.put(conn.recv())
    except (EOFError, OSError):
        inbox.put(Stop())


def serve(
    conn: Connection,
    scheduler: Scheduler,
    interval_ms: int = 0,
    group: Group | None = None,
    clock: ranks.Clock | None = None,
) -> None:
    """Run the messages and steps until told to stop; a decoding stream's pieces go out every `interval_ms`."""
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=read_inbox, args=(conn, inbox), daemon=True).start()
    livelock = faults.Livelock()
    pacer = pacing.Pacer(interval_ms / 1000)
    while True:
        messages = [inbox.get()] if not scheduler.busy else []
        while not inbox.empty():
            messages.append(inbox.get_nowait())
        if group is not None and clock is not None:
            share_step(group, clock, messages, scheduler.busy)
        for message in messages:
            if isinstance(message, Stop):
                return
            if isinstance(message, Submit):
                message = Submit(message.request_id, livelock.take(message.request_id, message.request))
            with faults.slow_disk(message, scheduler.cache.disk) as message:
                started = handle(message, scheduler, conn)
            if started:  # sent at once: the submission's disk-cache load, if any, reported its progress as it read
                conn.send(Events(started))
        events: list[Tagged] = []
        if livelock.on:
            time.sleep(0.01)  # the loop turns, no request moves
        elif scheduler.busy:
            events += scheduler.step()
            livelock.watch(events)
        while scheduler.failures:  # first, so the breaker has counted it before anyone sees the error
            conn.send(StepFailed(scheduler.failures.pop(0)))
        if events or pacer.held:
            if ready := pacer.take(events, lambda: scheduler.decoding):
                conn.send(Events(ready))


def share_step(group: Group, clock: ranks.Clock, messages: list[ToWorker], busy: bool) -> None:
    """Share the step's decisions and clock with the other ranks (queries are answered here alone)."""
    decisions = [m for m in messages if isinstance(m, STEP_MESSAGES)]
    if decisions or busy:
        clock.now = time.monotonic()
        ranks.share(group, Step(clock.now, decisions))


def follow(scheduler: Scheduler, group: Group, clock: ranks.Clock) -> None:
    """A rank other than 0: run the steps rank 0 shares, discarding the events (rank 0 sends them)."""
    while True:
        step: Step = ranks.share(group)
        clock.now = step.now
        for message in step.decisions:
            if isinstance(message, Stop):
                return
            handle(message, scheduler, None)
        if scheduler.busy:
            scheduler.step()
        scheduler.failures.clear()


def handle(message: ToWorker, scheduler: Scheduler, conn: Connection | None) -> list[Tagged]:
    """Apply one message; the events of a submission, replies to queries sent at once (on rank 0, with `conn`)."""
    match message:
        case Submit(request_id, request):
            return scheduler.submit(request_id, request)
        case Cancel(request_id):
            scheduler.cancel(request_id)
        case CountTokens(call, request):
            try:
                reply = Reply(call, scheduler.count_tokens(request))
            except RequestError as e:
                reply = Reply(call, Error("invalid_request", str(e)))
            assert conn is not None
            conn.send(reply)
        case GetStats(call):
            assert conn is not None
            conn.send(Reply(call, scheduler.stats()))
    return []


def main(argv: list[str] = sys.argv[1:]) -> int:
    ignore_signals()
    rank = ranks.launch_rank()
    conn, config = connect(argv[0]) if not rank else (None, None)
    group = join_group(rank, argv[1], conn, config) if rank is not None else None
    if group is not None:
        config = ranks.share(group, config if conn else None)
    assert config is not None
    loaded = load_model(config, conn, group, rank)
    if loaded is None:
        return 1
    disk = disk_tier(config, loaded, group, (lambda: conn.send(Working())) if conn else lambda: None)
    clock = ranks.Clock() if group else None  # a group orders its caches by rank 0's clock
    per_token = kv_bytes_per_token(loaded.model, group)
    cache = prefix_cache(config, loaded.model, per_token, disk, group, clock or time.monotonic)
    scheduler = Scheduler(loaded, config, cache, per_token)
    members = group_members(group, loaded)
    if conn is None:
        assert group is not None and clock is not None
        follow(scheduler, group, clock)
    else:
        interval = stream_interval_ms(config.stream_interval, mx.default_device() == mx.gpu)
        conn.send(Ready(ready_info(loaded, scheduler, members) | {"stream_interval_ms": interval}))
        serve(conn, scheduler, interval, group, clock)
    if disk:
        disk.flush()
    return 0


def ignore_signals() -> None:
    """The front process decides when the worker stops (Stop, or its connection closing): a Ctrl-C
    or SIGTERM sent to the whole process group must not cut the requests it lets finish."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def connect(address: str) -> tuple[Connection, EngineConfig]:
    """Connect back to the front process and receive the settings."""
    host, port = address.rsplit(":", 1)
    authkey = bytes.fromhex(os.environ.pop("MLX_TUI_AUTHKEY", "") or sys.stdin.readline().strip())
    conn = Client((host, int(port)), authkey=authkey)
    message = conn.recv()
    assert isinstance(message, Configure)
    return conn, message.config


def join_group(rank: int, backend: str, conn: Connection | None, config: EngineConfig | None) -> Group:
    """Meet the other ranks (rank 0 tells the front process if they do not come) and start this rank's heartbeat."""
    on_timeout = (lambda: conn.send(Fatal(unmet(config)))) if conn and config else (lambda: None)
    group = ranks.init(backend, on_timeout)
    ranks.heartbeat(rank)
    return group


def load_model(config: EngineConfig, conn: Connection | None, group: Group | None, rank: int | None) -> Loaded | None:
    """The model, its loading reported to the front process; None (and the reason sent or printed) if it failed."""

    def progress(phase: str, fraction: float) -> None:
        if conn:
            conn.send(LoadProgress(phase, fraction))

    try:
        loaded = load(
            config.model,
            progress,
            config.tool_parser,
            config.chat_template,
            group=group,
            shard=config.shard,
            dtype=config.dtype,
        )
        if why := cache_kinds.unbatchable(loaded.model):
            raise ModelError(f"{config.model}: {why}, so mlx-tui cannot serve it")
        return loaded
    except ModelError as e:
        if conn:
            conn.send(Fatal(str(e)))
        else:
            print(f"rank {rank}: {e}", file=sys.stderr)
        return None


def disk_tier(
    config: EngineConfig, loaded: Loaded, group: Group | None, progress: Callable[[], None]
) -> DiskCache | None:
    """The disk tier, which calls `progress` (rank 0 tells the front process) as each piece of a load is read."""
    if not config.cache_dir:
        return None
    where = (Path(config.cache_dir) / loaded.identity, int(config.cache_disk_gb * 2**30), loaded.identity, progress)
    return ranks.GroupDiskCache(group, *where) if group else DiskCache(*where)


def kv_bytes_per_token(model: Any, group: Group | None) -> int:
    """What one more token adds to the cache; in a group, the whole model's, the same on every rank."""
    per_token = cache_kinds.kv_bytes_per_token(model)
    return ranks.whole(group, per_token) if group else per_token


def prefix_cache(
    config: EngineConfig,
    model: Any,
    per_token: int,
    disk: DiskCache | None,
    group: Group | None,
    clock: Callable[[], float],
) -> PrefixCache:
    """In a group, every rank counts entries as the whole model's bytes, so that all evict alike."""
    if group:
        budget = ranks.cache_budget(group, config.cache_ram_bytes, per_token)
        per_snapshot = ranks.whole(group, cache_kinds.snapshot_bytes(model, config.prefill_step))
        return PrefixCache(budget, disk, clock, per_token, per_snapshot)
    return PrefixCache(config.cache_ram_bytes, disk, clock)


def group_members(group: Group | None, loaded: Loaded) -> dict[str, Any]:
    """Every rank's host and pid and how the model is split; seeds the ranks alike."""
    if group is None:
        return {}
    ranks.seed(group)
    return {"ranks": ranks.gather(group, ranks.describe(group)), "shard": loaded.shard}


def ready_info(loaded: Loaded, scheduler: Scheduler, members: dict[str, Any]) -> dict[str, Any]:
    tokenizer: Any = loaded.tokenizer
    return {
        "pid": os.getpid(),
        "context_length": loaded.context_length,
        "dtype": loaded.dtype,
        "dtype_note": loaded.dtype_note,
        "tool_parser": scheduler.parser_name,
        "cache_mode": scheduler.cache_mode,
        "speculation": scheduler.speculation_mode,
        "thinking": scheduler.think is not None,
        "eos": sorted(tokenizer.eos_token_ids),
        **members,
    }


def unmet(config: EngineConfig) -> str:
    hosts = f"the hosts in {config.hostfile}" if config.hostfile else f"{config.ranks} local ranks"
    return f"the ranks did not all connect within {ranks.CONNECT_TIMEOUT:g} s ({hosts}): is every host reachable?"


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown, which can hang on MLX's threads; the disk cache is flushed
