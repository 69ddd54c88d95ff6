"""The worker's supervisor: launch it, hear what it says, restart it with backoff when it exits or stalls."""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .breaker import CircuitBreaker
from .bus import EventBus, LogLine, WorkerChange
from .config import EngineConfig
from .inflight import InFlight
from .metrics import Metrics
from .protocol import Events, Fatal, FromWorker, LoadProgress, Ready, Reply, StepFailed, Working
from .rank_monitor import RankMonitor
from .worker_process import WorkerProcess

log = logging.getLogger("mlx_tui.engine")


class Supervisor:
    """Keeps one worker (or group) serving: its state, its messages, its restarts and the watchdog.

    States: "stopped", "loading", "ready", "restarting", "failed", "stopping"; each change
    is published on the bus as a "worker" event.
    """

    RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)

    def __init__(
        self,
        config: EngineConfig,
        env: dict[str, str],
        bus: EventBus,
        metrics: Metrics,
        breaker: CircuitBreaker,
        inflight: InFlight,
        on_progress: Callable[[str, float], None],
    ) -> None:
        self.config = config
        self.bus = bus
        self.metrics = metrics
        self.breaker = breaker
        self.inflight = inflight
        self.on_progress = on_progress
        self.worker = WorkerProcess(env, self.dispatch, self._output, self._exited)
        self.ranks = RankMonitor(config)
        self.state = "stopped"
        self.info: dict[str, Any] = {}
        self.restarts = 0
        self.fatal: str | None = None
        self.ready = asyncio.Event()
        self._exit = asyncio.Event()
        self._exit_code: int | None = None
        self._last_progress = time.monotonic()
        self._stalled = False

    @property
    def pid(self) -> int | None:
        return self.worker.pid

    @property
    def exited(self) -> bool:
        return self._exit.is_set()

    def dispatch(self, message: FromWorker) -> None:
        """Act on one message from the worker."""
        match message:
            case Events(events):
                self._last_progress = time.monotonic()  # a request's progress: a token, a prefill step, an answer
                self.inflight.deliver(events)
            case Reply(call, value):
                if not self.inflight.streams:  # a query answered is progress only when no request waits
                    self._last_progress = time.monotonic()
                self.inflight.answer(call, value)
            case Working():
                self._last_progress = time.monotonic()
            case StepFailed(reason):
                self.failure(reason)
            case LoadProgress(phase, fraction):
                self.on_progress(phase, fraction)
                self.bus.publish(WorkerChange(state="loading", phase=phase, fraction=fraction))
            case Ready(info):
                self.info = info
                self.set_state("ready")
                self.ready.set()
            case Fatal(reason):
                self.fatal = reason
                if self.worker.group:
                    self.worker.kill()  # mlx.launch would wait on the other ranks

    def failure(self, reason: str) -> None:
        """An engine failure: the breaker counts it, the bus shows it."""
        self.breaker.failure()
        self.bus.publish(WorkerChange(state=self.state, failure=reason, pid=self.pid, restarts=self.restarts))

    def set_state(self, state: str, message: str | None = None, exit_code: int | None = None) -> None:
        self.state = state
        if state != "ready":
            self.ready.clear()
        change = WorkerChange(state=state, pid=self.pid, restarts=self.restarts, message=message, exit_code=exit_code)
        self.bus.publish(change)

    def _output(self, line: str) -> None:
        """The worker's stderr, for the log: published on the bus and logged (stderr in --serve mode)."""
        if self.ranks.is_heartbeat(line):
            return
        log.warning("worker: %s", line)
        self.bus.publish(LogLine(source="worker", line=line))
        if self.ranks.ended(line) and self.state == "ready":
            self.worker.kill()  # the other ranks would wait for it, idle or not: restart the group now

    def _exited(self, code: int) -> None:
        self._exit_code = code
        self._exit.set()

    async def launch(self) -> bool:
        """Start a worker and wait for its model; False (with `fatal` set) if that failed."""
        self.set_state("loading")
        self._exit.clear()
        self.fatal = None
        self.ranks.reset()
        started = await self.worker.start(self.config)
        if started:
            ready = asyncio.ensure_future(self.ready.wait())
            exited = asyncio.ensure_future(self._exit.wait())
            await asyncio.wait([ready, exited], return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            exited.cancel()
        if self.state == "ready":
            return True
        code = await self.worker.wait(10)
        if self.ranks.lost is not None and not self.fatal:
            self.fatal = f"{self.ranks.name(self.ranks.lost)} of the worker group ended before the group was ready"
        self.fatal = self.fatal or f"the engine worker exited with code {code} before it was ready"
        self.set_state("failed", message=self.fatal)
        return False

    async def supervise(self) -> None:
        """Restart the worker whenever it exits, failing what was in flight, with backoff."""
        failures = 0
        while True:
            await self._exit.wait()
            reason = "stalled" if self._stalled else f"exited (code {self._exit_code})"
            if self._stalled and (silent := self.ranks.silent()):  # name the rank heard from least recently
                reason += f": {silent}"
            if self.ranks.lost is not None:
                reason += f": {self.ranks.name(self.ranks.lost)} ended"
            self._stalled = False
            self.failure(f"the worker {reason}")
            self.set_state("restarting", exit_code=self._exit_code)
            self.metrics.restarts.inc()
            self.inflight.fail(f"the engine worker {reason}; it is being restarted")
            await asyncio.sleep(self.RESTART_BACKOFF[min(failures, len(self.RESTART_BACKOFF) - 1)])
            self.restarts += 1
            failures = 0 if await self.launch() else failures + 1

    async def watchdog(self) -> None:
        """Kill a worker that has work but whose requests made no progress (no token, no prefill step, no piece of a
        disk-cache load) for too long.

        The stats tick's replies do not count while requests run: a worker whose loop turns
        while no request moves (a livelock) is stalled all the same.
        """
        timeout = self.config.stall_timeout
        while True:
            await asyncio.sleep(min(timeout / 4, 1.0))
            if self.state != "ready" or not self.inflight:
                self._last_progress = time.monotonic()
                continue
            if time.monotonic() - self._last_progress > timeout:
                self._stalled = True
                self.worker.kill()
                self._last_progress = time.monotonic()
