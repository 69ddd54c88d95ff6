"""The front process's handle on the engine: what the API and the dashboard use.

Admission (a bounded queue and the circuit breaker turn overload and repeated failures
into fast refusals) and each request's stream are here; the worker's supervision is in
`supervisor.py`, the bus and the stats tick in `observer.py`.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from itertools import count
from pathlib import Path
from typing import Any

from . import schemas
from .blas import worker_blas
from .breaker import CircuitBreaker
from .bus import EventBus
from .config import EngineConfig, served_name
from .events import TERMINAL, Error, Event
from .inflight import EngineUnavailable, InFlight
from .metrics import Metrics
from .observer import Observer
from .protocol import Cancel, CountTokens, GetStats, Stop, Submit, ToWorker
from .request import GenerationRequest
from .supervisor import Supervisor
from .transcripts import Transcript, Transcripts

__all__ = ["EngineClient", "EngineUnavailable", "ModelLoadError"]


class ModelLoadError(Exception):
    """The worker could not load the model; the message is one line."""


class EngineClient:
    """Starts the worker and streams events per request; `on_progress(phase, fraction)` reports loading."""

    RESTART_WAIT = 30.0

    def __init__(self, config: EngineConfig, on_progress: Callable[[str, float], None] | None = None) -> None:
        self.config = config
        self.bus = EventBus()
        self.metrics = Metrics()
        self.transcripts = Transcripts(self.bus, Path(config.transcripts_dir) if config.transcripts_dir else None)
        self.breaker = CircuitBreaker(config.breaker_threshold, config.breaker_cooldown)
        self.observer = Observer(self.bus, self.metrics, self.transcripts, self.breaker)
        self.blas, blas_env = worker_blas(config.blas, config.blas_threads)
        self.inflight = InFlight()
        self.supervisor = Supervisor(
            config,
            blas_env,
            self.bus,
            self.metrics,
            self.breaker,
            self.inflight,
            on_progress or (lambda phase, fraction: None),
        )
        self.started_at = time.time()
        self._ids = count()
        self._tasks: list[asyncio.Task] = []

    @property
    def pid(self) -> int | None:
        return self.supervisor.pid

    @property
    def model_name(self) -> str:
        return served_name(self.config.model)

    @property
    def state(self) -> str:
        return self.supervisor.state

    @property
    def info(self) -> dict[str, Any]:
        return self.supervisor.info

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    @property
    def last_stats(self) -> dict[str, Any]:
        return self.observer.last_stats

    async def start(self) -> None:
        """Start the worker and wait until its model is loaded."""
        if not await self.supervisor.launch():
            raise ModelLoadError(self.supervisor.fatal)
        self._tasks = [
            asyncio.create_task(t)
            for t in (
                self.supervisor.supervise(),
                self.supervisor.watchdog(),
                self.observer.tick(self.stats, self._tick_state),
            )
        ]

    async def drain(self, grace: float) -> None:
        """Refuse new requests, give the running ones `grace` seconds to finish, then end the rest with an error.

        The first step of a shutdown: supervision stops (nothing is restarted), the state
        becomes "stopping" (new requests get EngineUnavailable), and each stream still
        running after `grace` ends with an "engine" Error, which the API sends as the
        protocol's error event. Called again with a shorter grace (a second Ctrl-C), it
        ends them sooner.
        """
        for task in self._tasks:
            task.cancel()
        if self.state == "ready":
            self.supervisor.set_state("stopping")
        if self.state != "stopping":
            return
        deadline = time.monotonic() + grace
        while self.inflight.streams and not self.supervisor.exited and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.inflight.fail("the engine worker exited" if self.supervisor.exited else "the server is shutting down")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop the worker (it flushes its disk cache first); in-flight requests end with an error."""
        for task in self._tasks:
            task.cancel()
        loading = self.state == "loading"
        self.supervisor.set_state("stopped")
        worker = self.supervisor.worker
        worker.send(Stop())
        if loading or await worker.wait(grace) is None:
            worker.kill()
            await worker.wait(grace)
        self.inflight.fail("the engine stopped")

    def health(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "breaker": self.breaker.snapshot(),
            "rank_states": self.rank_states(),
        }

    def rank_states(self) -> list[dict[str, Any]]:
        return self.supervisor.ranks.states(self.state, self.pid, self.info)

    def _tick_state(self) -> dict[str, Any]:
        return {
            "breaker": self.breaker.snapshot(),
            "state": self.state,
            "restarts": self.restarts,
            "pid": self.pid,
            "rank_states": self.rank_states(),
        }

    async def generate(
        self, request: GenerationRequest, request_id: str | None = None, transcript: Transcript | None = None
    ) -> AsyncIterator[Event]:
        """The request's events, ending with Done or Error; leaving early cancels it.

        Raises EngineUnavailable before any event when the request cannot be taken; a schema
        that cannot be compiled ends it with an invalid_request Error before it is queued.
        Each step is published on the bus as a "request" event under `request_id`
        (unique among running requests), and noted in `transcript` when one is given.
        """
        if problem := await schemas.check(request, self.config.constrain_tools):
            error = Error("invalid_request", problem)
            if transcript:
                self.transcripts.record(transcript, error)
            yield error
            return
        await self._admit()
        request_id = request_id or f"req_{next(self._ids)}"
        events = self.inflight.open(request_id)
        self.observer.queued(request_id, request)
        finished = False
        try:
            self._send(Submit(request_id, request))
            async with asyncio.timeout(self.config.request_timeout or None):
                while not finished:
                    event = await events.get()
                    finished = isinstance(event, TERMINAL)
                    self.observer.observe(request_id, event, transcript)
                    yield event
        except TimeoutError:
            event = Error("timeout", f"the request took longer than {self.config.request_timeout:g} s")
            self.observer.observe(request_id, event, transcript)
            yield event
        finally:
            self.inflight.close(request_id)
            if not finished:
                self._send(Cancel(request_id))
                self.breaker.release()
                self.observer.cancelled(request_id)

    async def _admit(self) -> None:
        if self.state in ("loading", "restarting") and self.breaker.state != "open":
            try:
                await asyncio.wait_for(self.supervisor.ready.wait(), self.RESTART_WAIT)
            except TimeoutError:
                pass
        if self.state != "ready":
            raise EngineUnavailable(f"the engine is {self.state}", "down", self.supervisor.RESTART_BACKOFF[-1])
        running = len(self.inflight.streams)
        if running >= self.config.max_concurrency + self.config.max_queue:
            raise EngineUnavailable(f"the server is at capacity ({running} requests running or queued)", "busy")
        if not self.breaker.allow():
            raise EngineUnavailable(
                "the engine failed repeatedly; the circuit breaker is open",
                "breaker",
                self.breaker.next_probe_s() or 1.0,
            )

    async def count_tokens(self, request: GenerationRequest) -> int | Error:
        return await self._call(lambda call: CountTokens(call, request))

    async def stats(self) -> dict[str, Any]:
        return await self._call(GetStats)

    async def _call(self, message: Callable[[int], ToWorker]) -> Any:
        """Send the query `message(call)` and await its reply."""
        if self.state != "ready":
            raise EngineUnavailable(f"the engine is {self.state}", "down")
        call, reply = self.inflight.call()
        try:
            self._send(message(call))
            return await reply
        finally:
            self.inflight.hang_up(call)

    def _send(self, message: ToWorker) -> None:
        self.supervisor.worker.send(message)
