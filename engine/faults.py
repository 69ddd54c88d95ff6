"""Fault injection for tests: a request may carry `fault="KIND@N"`, acted on at its Nth generated token.

Off unless the server is started with `--debug-faults`, which lets the header
`X-MLX-TUI-Fault: KIND@N` set it. KIND is one of:
- `request_error`: this request's own output processing raises (it alone fails);
- `batch_error`: the batched step raises (every request in the step fails; the breaker counts it);
- `stall`: the worker stops making progress (the watchdog must kill and restart it);
- `exit`: the worker process exits at once;
- `livelock`: the worker's loop keeps turning and answering queries, but no request makes
  progress again (at the request's Nth piece of raw text; see `Livelock`);
- `slow_disk`: a disk-cache load for the request reads its file N bytes at a time, each piece
  `SLOW_PIECE_S` late (a slow disk: the load must show the watchdog its progress; see `slow_disk`).
"""

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

from .events import Event, RawText
from .protocol import Submit, ToWorker
from .request import GenerationRequest

if TYPE_CHECKING:
    from .disk_cache import DiskCache

KINDS = ("request_error", "batch_error", "stall", "exit", "livelock", "slow_disk")
SLOW_PIECE_S = 0.1


class InjectedFault(Exception):
    pass


def parse(spec: str) -> tuple[str, int]:
    kind, _, at = spec.partition("@")
    if kind not in KINDS or not at.isdigit():
        raise ValueError(f"fault must be KIND@N with KIND one of {', '.join(KINDS)}, got {spec!r}")
    return kind, int(at)


def act(kind: str) -> None:
    """Carry out a fault that takes the whole worker down."""
    if kind == "exit":
        os._exit(70)
    if kind == "stall":
        while True:
            time.sleep(3600)
    raise InjectedFault(f"injected {kind}")


class Livelock:
    """The worker's side of `livelock@N`: it takes the fault off the request and watches its raw text."""

    def __init__(self) -> None:
        self.at: dict[str, int] = {}  # request id: pieces of raw text left before the livelock
        self.on = False

    def take(self, request_id: str, request: GenerationRequest) -> GenerationRequest:
        """The request to run: as given, or without its livelock fault (which is then watched here)."""
        try:
            kind, at = parse(request.fault or "")
        except ValueError:
            return request  # no fault, or one the scheduler refuses
        if kind != "livelock":
            return request
        self.at[request_id] = at
        return replace(request, fault=None)

    def watch(self, events: list[tuple[str, Event]]) -> None:
        for request_id, event in events:
            if request_id in self.at and isinstance(event, RawText):
                self.at[request_id] -= 1
                self.on = self.on or self.at[request_id] <= 0


@contextmanager
def slow_disk(message: ToWorker, disk: "DiskCache | None") -> Iterator[ToWorker]:
    """The worker's side of `slow_disk@N`: while the message is handled, the disk tier reads N-byte pieces, slowly.

    Yields the message to handle: as given, or a submission without its `slow_disk` fault.
    """
    try:
        kind, at = parse(message.request.fault or "") if isinstance(message, Submit) else ("", 0)
    except ValueError:
        kind, at = "", 0  # no fault, or one the scheduler refuses
    if not isinstance(message, Submit) or kind != "slow_disk":
        yield message
        return
    plain = Submit(message.request_id, replace(message.request, fault=None))
    if disk is None:
        yield plain
        return
    piece, progress = disk.piece, disk.progress

    def late() -> None:
        time.sleep(SLOW_PIECE_S)
        progress()

    disk.piece, disk.progress = max(1, at), late
    try:
        yield plain
    finally:
        disk.piece, disk.progress = piece, progress
