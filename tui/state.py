"""The dashboard's state model: bus events (in-process or from `/v1/events`) folded into what the views show.

`State.apply(event)` takes one bus dict and returns the area it changed ("info", "stats",
"worker", "breaker", "requests", "transcripts", "connection"), so views redraw only what moved.
"""

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from mlx_tui.engine.transcripts import Transcript

HISTORY = 600  # one-second samples kept for the charts
KEEP = 200  # requests and transcripts kept


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

    def summarize(self, summary: dict):
        for name in ("source", "client", "started", "prompt_tokens", "cached_tokens", "constraint", "stop_reason", "error", "finished"):
            if name in summary:
                setattr(self, name, summary[name])

    def load(self, data: dict):
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

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.info: dict = {}
        self.stats: dict = {}
        self.decode_tps: deque[float] = deque(maxlen=HISTORY)
        self.prefill_tps: deque[float] = deque(maxlen=HISTORY)
        self.ttfts: deque[float] = deque(maxlen=KEEP)
        self.requests: OrderedDict[str, RequestRow] = OrderedDict()
        self.transcripts: OrderedDict[str, TranscriptRecord] = OrderedDict()
        self.worker = Worker()
        self.breaker = Breaker()
        self.connection: dict = {}

    def apply(self, event: dict) -> str:
        kind = event["kind"]
        if kind == "request":
            self._request(event)
            return "requests"
        if kind == "transcript":
            self._transcript(event)
            return "transcripts"
        if kind == "stats":
            self.stats = event
            self.decode_tps.append(event.get("decode_tps", 0.0))
            self.prefill_tps.append(event.get("prefill_tps", 0.0))
            if "breaker" in event:
                self._breaker(event["breaker"], event["time"])
            if "state" in event:
                self._worker({k: event[k] for k in ("state", "pid", "restarts") if k in event})
        elif kind == "worker":
            self._worker(event)
        elif kind == "breaker":
            self._breaker(event, event["time"])
        elif kind == "info":
            self.info.update({k: v for k, v in event.items() if k not in ("kind", "time")})
        elif kind == "connection":
            self.connection = event
        return kind

    def _breaker(self, snapshot: dict, at: float):
        b = self.breaker
        b.state, b.failures = snapshot.get("state", b.state), snapshot.get("failures", b.failures)
        b.next_probe_s, b.at = snapshot.get("next_probe_s"), at

    def _worker(self, event: dict):
        w = self.worker
        if event["state"] != w.state:
            w.phase, w.fraction, w.message = "", 0.0, ""
        w.state = event["state"]
        w.pid = event.get("pid", w.pid)
        w.restarts = event.get("restarts", w.restarts)
        w.phase = event.get("phase", w.phase)
        w.fraction = event.get("fraction", w.fraction)
        w.message = event.get("message") or event.get("failure") or w.message

    def _request(self, event: dict):
        id, phase = event["id"], event["phase"]
        row = self.requests.get(id)
        if row is None:
            row = self.requests[id] = RequestRow(id, received=event["time"])
            while len(self.requests) > KEEP:
                self.requests.popitem(last=False)
        if phase == "queued":
            row.source, row.client = event.get("source", ""), event.get("client", "")
        elif phase == "prefill":
            row.prompt_tokens = event.get("prompt_tokens", row.prompt_tokens)
            row.cached_tokens = event.get("cached_tokens", row.cached_tokens)
            row.prefill_done = event.get("done", row.prefill_done)
            row.prefill_total = event.get("total", row.prefill_total)
            row.constraint = event.get("constraint", row.constraint)
        elif phase == "done":
            for name in ("stop_reason", "note", "prompt_tokens", "cached_tokens", "generated_tokens", "ttft_s", "decode_s"):
                setattr(row, name, event.get(name))
            if row.ttft_s is not None:
                self.ttfts.append(row.ttft_s)
        elif phase == "error":
            row.error = f"{event.get('error_kind')}: {event.get('message')}"
        row.phase = phase

    def _transcript(self, event: dict):
        id, step = event["id"], event["step"]
        record = self.transcripts.get(id)
        if record is None:
            record = self.transcripts[id] = TranscriptRecord(id, started=event["time"], complete=step == "open")
            while len(self.transcripts) > KEEP:
                self.transcripts.popitem(last=False)
        if step == "open":
            record.summarize(event["summary"])
            record.received = event.get("received")
        elif step == "prompt":
            record.prompt, record.cached_chars = event["prompt"], event["cached_chars"]
            record.constraint, record.constraint_from = event.get("constraint", ""), event.get("constraint_from", "")
        elif step == "raw":
            record.add_raw(event["text"])
        elif step == "tool_call":
            record.tool_calls.append(event["call"])
            if row := self.requests.get(id):
                row.tool_calls += 1
        elif step == "parse_error":
            record.parse_errors.append(event["error"])
        elif step == "sent":
            record.sent.extend(event["texts"])
        elif step == "finish":
            record.summarize(event["summary"])
        elif step == "full":
            record.load(event["transcript"])

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
