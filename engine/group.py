"""The worker as a group of ranks started by `mlx.launch`: rank 0 decides, every rank runs the same steps.

Rank 0 talks to the front process. Before each step it shares the step's decisions (the
submitted and cancelled requests and its clock, which orders the prefix cache) with
`share`, the way `mlx_lm.server` shares its requests; the other ranks apply them to
their own scheduler, so that every rank inserts the same prompts with the same cached
prefixes, and each keeps its own shard of the cached KV state.
"""

import os
import pickle
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream

from .config import HEARTBEAT, HEARTBEAT_S
from .disk_cache import DiskCache
from .prefix_cache import Entry, truncate

# Every collective here runs on the stream mlx-lm's BatchGenerator evaluates the model on: on another
# stream, a step's broadcast could reach the sockets between the model's own all-reduces.

# How long the ranks may take to find each other; `mx.distributed.init` waits forever for a missing one.
CONNECT_TIMEOUT = 30.0


def launch_rank() -> int | None:
    """This process's rank as `mlx.launch` set it (ring: MLX_RANK, mpi: OMPI_COMM_WORLD_RANK), or None alone."""
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK"):
        if (value := os.environ.get(name)) is not None:
            return int(value)
    return None


def init(backend: str, on_timeout: Callable[[], None]) -> mx.distributed.Group:
    """Join the group; `on_timeout()` is called (and the process ends) if the ranks have not met in time."""
    met = threading.Event()

    def expire() -> None:
        if not met.wait(CONNECT_TIMEOUT):
            on_timeout()
            os._exit(1)

    threading.Thread(target=expire, daemon=True).start()
    group = mx.distributed.init(strict=True, backend=backend)
    mx.eval(mx.distributed.all_sum(mx.array(1), group=group, stream=generation_stream))
    met.set()
    return group


# mlx's stubs are narrower than mlx: arrays from bytes, scalars for arrays, buffers of arrays, item() as int
def share(group: mx.distributed.Group, obj: Any = None) -> Any:
    """Rank 0's `obj`, on every rank (the others pass None)."""
    if group.rank() == 0:
        data = mx.array(pickle.dumps(obj))  # type: ignore[arg-type]  # see above
        mx.eval(mx.distributed.all_sum(data.size, group=group, stream=generation_stream))  # type: ignore[arg-type]
        mx.eval(mx.distributed.all_sum(data, group=group, stream=generation_stream))
        return obj
    size = mx.distributed.all_sum(0, group=group, stream=generation_stream).item()  # type: ignore[arg-type]
    data = mx.distributed.all_sum(mx.zeros(size, dtype=mx.uint8), group=group, stream=generation_stream)  # type: ignore[arg-type]
    return pickle.loads(data)  # type: ignore[arg-type]  # see above


def gather(group: mx.distributed.Group, obj: Any) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    data = pickle.dumps(obj)
    n, rank = group.size(), group.rank()
    mine = mx.array([len(data) if r == rank else 0 for r in range(n)])
    sizes = cast(list[int], mx.distributed.all_sum(mine, group=group, stream=generation_stream).tolist())
    rows = mx.zeros((n, max(sizes)), dtype=mx.uint8)
    rows[rank, : len(data)] = mx.array(list(data), dtype=mx.uint8)
    rows = mx.distributed.all_sum(rows, group=group, stream=generation_stream)
    return [pickle.loads(np.array(rows[r, :size]).tobytes()) for r, size in enumerate(sizes)]


def least(group: mx.distributed.Group, *values: int) -> list[int]:
    """Each value's smallest over the ranks, on every rank."""
    return cast(
        list[int],
        mx.distributed.all_min(mx.array([int(v) for v in values]), group=group, stream=generation_stream).tolist(),
    )


def whole(group: mx.distributed.Group, value: int) -> int:
    """The sum of `value` over the ranks, on every rank."""
    total = mx.distributed.all_sum(mx.array(int(value)), group=group, stream=generation_stream)
    return int(total.item())  # type: ignore[arg-type]  # item() is typed to allow complex; this is an int


def cache_budget(group: mx.distributed.Group, budget: int, bytes_per_token: int) -> int:
    """The prefix cache's RAM budget on every rank: the smallest rank's, in whole tokens of `bytes_per_token`.

    Every rank must keep and evict the same entries (a hit on rank 0 is a hit on all), so
    all count an entry as the whole model's KV bytes for its tokens, whatever their share.
    """
    [tokens] = least(group, budget // max(1, bytes_per_token))
    return tokens * bytes_per_token


def seed(group: mx.distributed.Group) -> None:
    """The same random state on every rank, so sampled tokens agree (as `mlx_lm.server` does)."""
    # mx.random.state is typed as an object, item() to allow floats: it is a list of key arrays, a uint64 here
    state = mx.distributed.all_sum(mx.random.state[0], group=group, stream=generation_stream)  # type: ignore[index]
    mx.random.seed(state.view(mx.uint64).item())  # type: ignore[arg-type]


def heartbeat(rank: int) -> None:
    """Say on stderr, once a second, that this rank runs and how much CPU time it has used.

    mlx.launch passes it on to the front process, which can then tell a rank that has
    stopped (or is starved) from the others while the group waits for it.
    """

    def beat() -> None:
        while True:
            print(f"{HEARTBEAT} {rank} {time.process_time():.3f}", file=sys.stderr, flush=True)
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=beat, daemon=True).start()


def describe(group: mx.distributed.Group) -> dict:
    return {"rank": group.rank(), "host": socket.gethostname(), "pid": os.getpid()}


class Clock:
    """The prefix cache's clock on every rank: rank 0's time, as shared with each step."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


class GroupDiskCache(DiskCache):
    """A rank's own disk tier, read only as the whole group agrees.

    Each rank writes its shard of every entry behind, in its own thread and folder, so one
    rank may not have written a file yet, or have lost or damaged it, while another has it;
    a lookup decided on each rank alone would then set the ranks on different steps. Here the
    ranks read the longest prefix that every rank holds, each entry cut to that length (so
    the ranks' memory tiers stay alike), and all fall back to memory if any rank's file is unsound.
    """

    def __init__(self, group: mx.distributed.Group, *args: Any) -> None:
        self.group = group
        super().__init__(*args)

    def fetch(self, tokens: np.ndarray, beyond: int, clock: float) -> Entry | None:
        found, held = self.longest(tokens)
        [agreed] = least(self.group, held)
        if agreed <= beyond:
            return None
        assert found is not None  # agreed > beyond ≥ 0, so this rank holds one
        loaded = self.load(found, clock)
        whole = loaded is not None and loaded.checkpoint and len(loaded.tokens) == agreed
        sound, checkpoint = least(self.group, loaded is not None, whole)
        if not sound:
            return None
        assert loaded is not None  # sound: every rank loaded its entry
        if len(loaded.tokens) > agreed:
            if (n := loaded.resumable(agreed)) <= beyond:  # alike on every rank: their entries have one shape
                return None
            loaded = truncate(loaded, n, clock)
        loaded.checkpoint = bool(checkpoint)
        return loaded
