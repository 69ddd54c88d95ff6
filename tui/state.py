"""The dashboard's state model: bus events (in-process or from `/v1/events`) folded into what the views show.

`State.apply(event)` takes one event (a bus event, or the source's own `Info` and
`ConnectionChange`) and returns the area it changed ("info", "stats", "worker", "breaker",
"requests", "transcripts", "connection"), so views redraw only what moved.
"""

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeAlias

from mlx_tui.engine.bus import (
    BreakerChange,
    BusEvent,
    LogLine,
    RequestStep,
    StatsTick,
    TranscriptStep,
    WorkerChange,
)
from mlx_tui.engine.transcripts import Transcript

HISTORY = 600  # one-second samples kept for the charts
KEEP = 200  # requests and transcripts kept


@dataclass(slots=True, frozen=True, kw_only=True)
class Info:
    """What the dashboard's source knows of the server: model, address, BLAS, dtype, the worker's info..."""

    values: dict[str, Any]
    time: float = field(default_factory=time.time)


@dataclass(slots=True, frozen=True, kw_only=True)
class ConnectionChange:
    """Attached: the server is reachable, or not (why, and when the next try is)."""

    state: str  # "connected" or "unreachable"
    time: float = field(default_factory=time.time)
    error: str | None = None
    retry_s: float | None = None


DashboardEvent: TypeAlias = BusEvent | Info | ConnectionChange


@dataclass(slots=True)
class RequestRow:
    """One request's line in the recent-requests table."""

    id: str
    received: float
    source: str = ""
    client: str = ""
    phase: str = "queued"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefill_done: int = 0
    prefill_total: int = 0
    generated_tokens: int = 0
    ttft_s: float | None = None
    decode_s: float | None = None
    stop_reason: str | None = None
    note: str | None = None
    tool_calls: int = 0
    error: str | None = None
    constraint: str = ""  # the grammar it runs under ("": none)

    @property
    def tokens_per_s(self) -> float | None:
        return self.generated_tokens / self.decode_s if self.decode_s else None


@dataclass(slots=True)
class TranscriptRecord(Transcript):
    """A transcript as the views know it; `as_dict()` has the shape of `/v1/transcripts/{id}`."""

    complete: bool = True  # False when only its summary is known (attached after it began)

    def summarize(self, summary: dict) -> None:
        for name in (
            "source",
            "client",
            "started",
            "prompt_tokens",
            "cached_tokens",
            "constraint",
            "stop_reason",
            "generated_tokens",
            "drafted_tokens",
            "error",
            "finished",
        ):
            if name in summary:
                setattr(self, name, summary[name])

    def load(self, data: dict) -> None:
        """Take every field of a full transcript (as `/v1/transcripts/{id}` serves it)."""
        for name in (f.name for f in fields(self)):
            if name in data and name not in ("id", "complete"):
                setattr(self, name, data[name])
        self.complete = True

    def as_dict(self) -> dict:
        record = asdict(self)
        del record["complete"]
        return record

    @property
    def failed(self) -> bool:
        return bool(self.error or self.parse_errors)


@dataclass(slots=True)
class Worker:
    state: str = "stopped"
    pid: int | None = None
    restarts: int = 0
    phase: str = ""
    fraction: float = 0.0
    message: str = ""


@dataclass(slots=True)
class Breaker:
    state: str = "closed"
    failures: int = 0
    next_probe_s: float | None = None
    at: float = 0.0  # when next_probe_s was measured

    def probe_in(self, now: float) -> float | None:
        return None if self.next_probe_s is None else max(0.0, self.next_probe_s - (now - self.at))


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile, or None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class State:
    """Everything the dashboard, the requests table and the transcripts view show."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.info: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}
        self.decode_tps: deque[float] = deque(maxlen=HISTORY)
        self.prefill_tps: deque[float] = deque(maxlen=HISTORY)
        self.ttfts: deque[float] = deque(maxlen=KEEP)
        self.requests: OrderedDict[str, RequestRow] = OrderedDict()
        self.transcripts: OrderedDict[str, TranscriptRecord] = OrderedDict()
        self.worker = Worker()
        self.breaker = Breaker()
        self.connection: ConnectionChange | None = None

    def apply(self, event: DashboardEvent) -> str:
        match event:
            case RequestStep():
                self._request(event)
                return "requests"
            case TranscriptStep():
                self._transcript(event)
                return "transcripts"
            case StatsTick():
                self.stats = {**event.values, "rank_states": event.rank_states or []}
                self.decode_tps.append(event.values.get("decode_tps", 0.0))
                self.prefill_tps.append(event.values.get("prefill_tps", 0.0))
                if event.breaker is not None:
                    self._breaker(event.breaker, event.time)
                if event.state is not None:
                    self._worker(WorkerChange(state=event.state, pid=event.pid, restarts=event.restarts))
                return "stats"
            case WorkerChange():
                self._worker(event)
                return "worker"
            case BreakerChange():
                snapshot = {"state": event.state, "failures": event.failures, "next_probe_s": event.next_probe_s}
                self._breaker(snapshot, event.time)
                return "breaker"
            case Info():
                self.info.update(event.values)
                return "info"
            case ConnectionChange():
                self.connection = event
                return "connection"
            case LogLine():
                return "log"
        raise TypeError(f"not a dashboard event: {event!r}")

    def _breaker(self, snapshot: dict[str, Any], at: float) -> None:
        b = self.breaker
        b.state = snapshot.get("state") or b.state
        b.failures = snapshot["failures"] if snapshot.get("failures") is not None else b.failures
        b.next_probe_s, b.at = snapshot.get("next_probe_s"), at

    def _worker(self, event: WorkerChange) -> None:
        w = self.worker
        if event.state != w.state:
            w.phase, w.fraction, w.message = "", 0.0, ""
        w.state = event.state
        w.pid = event.pid if event.pid is not None else w.pid
        w.restarts = event.restarts if event.restarts is not None else w.restarts
        w.phase = event.phase if event.phase is not None else w.phase
        w.fraction = event.fraction if event.fraction is not None else w.fraction
        w.message = event.message or event.failure or w.message

    def _request(self, event: RequestStep) -> None:
        id, phase = event.id, event.phase
        row = self.requests.get(id)
        if row is None:
            row = self.requests[id] = RequestRow(id, received=event.time)
            while len(self.requests) > KEEP:
                self.requests.popitem(last=False)
        if phase == "queued":
            row.source, row.client = event.source or "", event.client or ""
        elif phase == "prefill":
            row.prompt_tokens = row.prompt_tokens if event.prompt_tokens is None else event.prompt_tokens
            row.cached_tokens = row.cached_tokens if event.cached_tokens is None else event.cached_tokens
            row.prefill_done = row.prefill_done if event.done is None else event.done
            row.prefill_total = row.prefill_total if event.total is None else event.total
            row.constraint = row.constraint if event.constraint is None else event.constraint
        elif phase == "done":
            row.stop_reason, row.note, row.ttft_s, row.decode_s = (
                event.stop_reason,
                event.note,
                event.ttft_s,
                event.decode_s,
            )
            row.prompt_tokens = event.prompt_tokens or 0
            row.cached_tokens = event.cached_tokens or 0
            row.generated_tokens = event.generated_tokens or 0
            if row.ttft_s is not None:
                self.ttfts.append(row.ttft_s)
        elif phase == "error":
            row.error = f"{event.error_kind}: {event.message}"
        row.phase = phase

    def _transcript(self, event: TranscriptStep) -> None:
        id, step = event.id, event.step
        record = self.transcripts.get(id)
        if record is None:
            record = self.transcripts[id] = TranscriptRecord(id, started=event.time, complete=step == "open")
            while len(self.transcripts) > KEEP:
                self.transcripts.popitem(last=False)
        if step in ("open", "finish") and event.summary is not None:
            record.summarize(event.summary)
        if step == "open":
            record.received = event.received
        elif step == "prompt":
            record.prompt, record.cached_chars = event.prompt or "", event.cached_chars or 0
            record.constraint, record.constraint_from = event.constraint or "", event.constraint_from or ""
        elif step == "raw":
            record.add_raw(event.text or "")
        elif step == "tool_call" and event.call is not None:
            record.tool_calls.append(event.call)
            if row := self.requests.get(id):
                row.tool_calls += 1
        elif step == "parse_error" and event.error is not None:
            record.parse_errors.append(event.error)
        elif step == "sent":
            record.sent.extend(event.texts or ())
        elif step == "full" and event.transcript is not None:
            record.load(event.transcript)

    @property
    def ttft_p50(self) -> float | None:
        return percentile(list(self.ttfts), 0.5)

    @property
    def ttft_p95(self) -> float | None:
        return percentile(list(self.ttfts), 0.95)

    @property
    def cache(self) -> dict:
        return self.stats.get("cache", {})

    @property
    def token_hit_rate(self) -> float | None:
        """The share of looked-up prompt tokens that the prefix cache served."""
        c = self.cache
        return c["reused_tokens"] / c["prompt_tokens"] if c.get("prompt_tokens") else None

    @property
    def request_hit_rate(self) -> float | None:
        """The share of requests that reused some cached prefix."""
        c = self.cache
        return c["hits"] / c["lookups"] if c.get("lookups") else None

    @property
    def uptime_s(self) -> float | None:
        started = self.info.get("started_at")
        return None if started is None else max(0.0, self.clock() - started)
