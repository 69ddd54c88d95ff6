"""What the front process tells about the engine: each request's steps and a stats tick, on the bus and in metrics."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .breaker import CircuitBreaker
from .bus import BreakerChange, EventBus, RequestStep, StatsTick
from .events import Done, Error, Event, PrefillProgress, Started, TextDelta, ToolCallEnd
from .inflight import EngineUnavailable
from .metrics import BREAKER_STATES, Metrics
from .request import GenerationRequest
from .transcripts import Transcript, Transcripts


class Observer:
    """Counts each request's events, records its transcript, settles the breaker and publishes its lifecycle."""

    STATS_INTERVAL = 1.0

    def __init__(self, bus: EventBus, metrics: Metrics, transcripts: Transcripts, breaker: CircuitBreaker) -> None:
        self.bus = bus
        self.metrics = metrics
        self.transcripts = transcripts
        self.breaker = breaker
        breaker.on_change = self.breaker_changed
        self.last_stats: dict[str, Any] = {}
        self._generating: set[str] = set()

    def queued(self, request_id: str, request: GenerationRequest) -> None:
        self.bus.publish(RequestStep(id=request_id, phase="queued", source=request.source, client=request.client))

    def cancelled(self, request_id: str) -> None:
        self._generating.discard(request_id)
        self.bus.publish(RequestStep(id=request_id, phase="cancelled"))

    def observe(self, request_id: str, event: Event, transcript: Transcript | None) -> None:
        """Count the event, settle the breaker, record the transcript, publish the lifecycle step."""
        self.metrics.observe(event)
        if transcript:
            self.transcripts.record(transcript, event)
        step = None
        if isinstance(event, Started):
            step = RequestStep(
                id=request_id,
                phase="prefill",
                prompt_tokens=event.prompt_tokens,
                cached_tokens=event.cached_tokens,
                constraint=event.constraint,
            )
        elif isinstance(event, PrefillProgress):
            step = RequestStep(id=request_id, phase="prefill", done=event.done, total=event.total)
        elif isinstance(event, (TextDelta, ToolCallEnd)) and request_id not in self._generating:
            self._generating.add(request_id)
            step = RequestStep(id=request_id, phase="generating")
        elif isinstance(event, Done):
            self.breaker.success()
            self._generating.discard(request_id)
            step = RequestStep(
                id=request_id,
                phase="done",
                stop_reason=event.stop_reason,
                note=event.note,
                prompt_tokens=event.usage.prompt_tokens,
                cached_tokens=event.usage.cached_tokens,
                generated_tokens=event.usage.generated_tokens,
                ttft_s=event.timings.queued_s + event.timings.prefill_s,
                decode_s=event.timings.decode_s,
            )
        elif isinstance(event, Error):
            if event.kind != "engine":
                self.breaker.release()
            self._generating.discard(request_id)
            self.metrics.failures.labels(event.kind).inc()
            step = RequestStep(id=request_id, phase="error", error_kind=event.kind, message=event.message)
        if step:
            self.bus.publish(step)

    def breaker_changed(self, state: str) -> None:
        self.metrics.breaker.set(BREAKER_STATES[state])
        snapshot = self.breaker.snapshot()
        self.bus.publish(
            BreakerChange(state=state, failures=snapshot["failures"], next_probe_s=snapshot["next_probe_s"])
        )

    async def tick(
        self, stats: Callable[[], Awaitable[dict[str, Any]]], engine_state: Callable[[], dict[str, Any]]
    ) -> None:
        """Publish the worker's `stats()` once a second, with throughput since the last tick and `engine_state()`."""
        previous: dict[str, Any] | None = None
        then = time.monotonic()
        while True:
            await asyncio.sleep(self.STATS_INTERVAL)
            try:
                current = await stats()
            except EngineUnavailable:
                continue
            now = time.monotonic()
            if previous:
                elapsed = now - then
                for rate, total in (("decode_tps", "generation_tokens_total"), ("prefill_tps", "prefill_tokens_total")):
                    current[rate] = (current[total] - previous[total]) / elapsed
            previous, then = current, now
            self.metrics.running.set(current["running"])
            self.metrics.waiting.set(current["waiting"])
            self.metrics.cache_bytes.labels("ram").set(current["cache"]["ram_bytes"])
            self.metrics.cache_bytes.labels("disk").set(current["cache"]["disk_bytes"])
            self.metrics.cache_bytes.labels("snapshots").set(current["cache"]["snapshot_bytes"])
            self.metrics.cache_snapshots.set(current["cache"]["snapshots"])
            state = engine_state()
            self.metrics.observe_stats(current, state.get("pid"))
            self.last_stats = current
            self.bus.publish(StatsTick(values=current, **state))
