"""The messages between the front process and the engine worker, and rank 0's step shared with a group.

Sent pickled over the worker's `multiprocessing.connection`. A request is named by its
`request_id` (the id the API and the dashboard show) from submission to its last event;
a query (`CountTokens`, `GetStats`) by a `call` number its `Reply` carries back.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import EngineConfig
from .events import Event
from .request import GenerationRequest

# Front process to worker


@dataclass(slots=True, frozen=True)
class Configure:
    """The first message: the settings to load the model with."""

    config: EngineConfig


@dataclass(slots=True, frozen=True)
class Submit:
    request_id: str
    request: GenerationRequest


@dataclass(slots=True, frozen=True)
class Cancel:
    request_id: str


@dataclass(slots=True, frozen=True)
class CountTokens:
    call: int
    request: GenerationRequest


@dataclass(slots=True, frozen=True)
class GetStats:
    call: int


@dataclass(slots=True, frozen=True)
class Stop:
    """Finish: flush the disk cache and exit (also what a lost connection means)."""


ToWorker = Configure | Submit | Cancel | CountTokens | GetStats | Stop
STEP_MESSAGES = (Submit, Cancel, Stop)  # what changes the batch; in a group every rank applies them


# Worker to front process


@dataclass(slots=True, frozen=True)
class LoadProgress:
    phase: str
    fraction: float


@dataclass(slots=True, frozen=True)
class Ready:
    """The model is loaded; `info` is what `EngineClient.info` shows (pid, context length, dtype, tool parser...)."""

    info: dict[str, Any]


@dataclass(slots=True, frozen=True)
class Fatal:
    """The worker cannot serve (the model did not load, the ranks did not meet); one line."""

    message: str


@dataclass(slots=True, frozen=True)
class Events:
    """Requests' events from one step, in order.

    Pickled flat, each event as its class and field values: the default way, a frozen
    dataclass's state passes through Python functions on both sides, which costs several
    times more, and the worker sends this once per step.
    """

    events: list[tuple[str, Event]]

    def __reduce__(self) -> tuple[Callable[[list[tuple]], "Events"], tuple[list[tuple]]]:
        return unflatten, ([(rid, type(e), *[getattr(e, f) for f in e.__slots__]) for rid, e in self.events],)


def unflatten(flat: list[tuple]) -> Events:
    return Events([(rid, kind(*fields)) for rid, kind, *fields in flat])


@dataclass(slots=True, frozen=True)
class Reply:
    call: int
    value: Any


@dataclass(slots=True, frozen=True)
class Working:
    """A long step is moving (a disk-cache load read another piece): progress for the watchdog, like a token."""


@dataclass(slots=True, frozen=True)
class StepFailed:
    """A batched step failed (every request in it ends with an engine Error); the breaker counts it."""

    message: str


FromWorker = LoadProgress | Ready | Fatal | Events | Reply | Working | StepFailed


# Rank 0 to the other ranks of a group


@dataclass(slots=True, frozen=True)
class Step:
    """One step's decisions and rank 0's clock (which orders the prefix cache)."""

    now: float
    decisions: list[Submit | Cancel | Stop]
