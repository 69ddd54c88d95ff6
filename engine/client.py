"""The front process's handle on the engine: supervise the worker, guard it, stream requests through it.

The supervisor restarts a worker that exits or stops making progress, failing what was
in flight; the circuit breaker turns repeated engine failures into fast refusals; a
bounded queue turns overload into fast refusals too.
"""

import asyncio
import itertools
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from . import schemas
from .blas import worker_blas
from .breaker import CircuitBreaker
from .bus import EventBus
from .config import HEARTBEAT, HEARTBEAT_S, EngineConfig, hostfile_hosts
from .events import TERMINAL, Done, Error, Event, PrefillProgress, Started, TextDelta, ToolCallEnd
from .metrics import BREAKER_STATES, Metrics
from .request import Request
from .transcripts import Transcript, Transcripts
from .worker_process import WorkerProcess


log = logging.getLogger("mlx_tui.engine")

# What mlx.launch writes when one rank of the group ends; the first one named is the one that failed.
RANK_ENDED = re.compile(r"Node with rank (\d+) (?:exited|was killed)")


class EngineUnavailable(Exception):
    """The engine cannot take the request now; `retry_after` is a hint in seconds.

    `reason` is "breaker" (open circuit), "busy" (the queue is full) or "down"
    (loading, restarting, failed or stopped).
    """

    def __init__(self, message: str, reason: str, retry_after: float = 1.0):
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class ModelLoadError(Exception):
    """The worker could not load the model; the message is one line."""


class EngineClient:
    """Starts the worker and streams events per request; `on_progress(phase, fraction)` reports loading."""

    RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)
    STATS_INTERVAL = 1.0
    RESTART_WAIT = 30.0

    def __init__(self, config: EngineConfig, on_progress: Callable[[str, float], None] | None = None):
        self.config = config
        self.on_progress = on_progress or (lambda phase, fraction: None)
        self.bus = EventBus()
        self.metrics = Metrics()
        self.transcripts = Transcripts(self.bus, Path(config.transcripts_dir) if config.transcripts_dir else None)
        self.breaker = CircuitBreaker(
            config.breaker_threshold, config.breaker_cooldown, on_change=self._breaker_changed
        )
        self.blas, blas_env = worker_blas(config.blas, config.blas_threads)
        self.worker = WorkerProcess(blas_env, self._dispatch, self._worker_output, self._exited)
        self.state = "stopped"
        self.info: dict = {}
        self.restarts = 0
        self.last_stats: dict = {}
        self.started_at = time.time()
        self._ids = itertools.count()
        self._streams: dict[int, asyncio.Queue] = {}
        self._replies: dict[int, asyncio.Future] = {}
        self._generating: set[str] = set()
        self._ready = asyncio.Event()
        self._exit = asyncio.Event()
        self._exit_code: int | None = None
        self._fatal: str | None = None
        self._last_progress = time.monotonic()
        self._stalled = False
        self._tasks: list[asyncio.Task] = []
        self._lost_rank: int | None = None
        self._beats: dict[int, tuple[float, float, float | None]] = {}  # rank: (when, CPU seconds, CPU share)
        self._hosts = (hostfile_hosts(config.hostfile, config.backend) if config.hostfile
                       else [socket.gethostname()] * config.ranks)

    @property
    def pid(self) -> int | None:
        return self.worker.pid

    async def start(self):
        """Start the worker and wait until its model is loaded."""
        if not await self._launch():
            raise ModelLoadError(self._fatal)
        self._tasks = [asyncio.create_task(t) for t in (self._supervise(), self._tick(), self._watchdog())]

    async def drain(self, grace: float):
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
            self._set_state("stopping")
        if self.state != "stopping":
            return
        deadline = time.monotonic() + grace
        while self._streams and not self._exit.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._fail_in_flight("the engine worker exited" if self._exit.is_set() else "the server is shutting down")

    async def stop(self, grace: float = 10.0):
        """Stop the worker (it flushes its disk cache first); in-flight requests end with an error."""
        for task in self._tasks:
            task.cancel()
        loading = self.state == "loading"
        self._set_state("stopped")
        self.worker.send(("stop",))
        if loading or await self.worker.wait(grace) is None:
            self.worker.kill()
            await self.worker.wait(grace)
        self._fail_in_flight("the engine stopped")

    def health(self) -> dict:
        return {"state": self.state, "pid": self.pid, "restarts": self.restarts, "breaker": self.breaker.snapshot(),
                "rank_states": self.rank_states()}

    STALE_S = 3 * HEARTBEAT_S  # a rank silent this long is shown as stalled

    def rank_states(self) -> list[dict]:
        """Each rank's host, pid, state and share of a core in use (from its heartbeat).

        The state is the group's, but "gone" for the rank whose end took the group down and
        "stalled" for a rank whose heartbeat stopped (stopped, or starved of CPU).
        """
        members = self.info.get("ranks")
        if not members:  # one worker, or a group still starting
            alone = len(self._hosts) == 1
            members = [{"rank": r, "host": h, "pid": self.pid if alone else None} for r, h in enumerate(self._hosts)]
        now = time.monotonic()
        states = []
        for m in members:
            when, _, cpu = self._beats.get(m["rank"], (now, 0.0, None))
            state = self.state
            if m["rank"] == self._lost_rank:
                state = "gone"
            elif state == "ready" and now - when > self.STALE_S:
                state = "stalled"
            states.append({**m, "state": state, "cpu": cpu})
        return states

    async def generate(
        self, request: Request, request_id: str | None = None, transcript: Transcript | None = None
    ) -> AsyncIterator[Event]:
        """The request's events, ending with Done or Error; leaving early cancels it.

        Raises EngineUnavailable before any event when the request cannot be taken; a schema
        that cannot be compiled ends it with an invalid_request Error before it is queued.
        Each step is published on the bus as a "request" event under `request_id`,
        and noted in `transcript` when one is given.
        """
        if problem := await schemas.check(request, self.config.constrain_tools):
            error = Error("invalid_request", problem)
            if transcript:
                self.transcripts.record(transcript, error)
            yield error
            return
        await self._admit()
        rid = next(self._ids)
        request_id = request_id or f"req_{rid}"
        events: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = events
        self.bus.publish("request", id=request_id, phase="queued", source=request.source, client=request.client)
        finished = False
        try:
            self.worker.send(("submit", rid, request))
            async with asyncio.timeout(self.config.request_timeout or None):
                while not finished:
                    event = await events.get()
                    finished = isinstance(event, TERMINAL)
                    self._observe(request_id, event, transcript)
                    yield event
        except TimeoutError:
            event = Error("timeout", f"the request took longer than {self.config.request_timeout:g} s")
            self._observe(request_id, event, transcript)
            yield event
        finally:
            del self._streams[rid]
            if not finished:
                self._generating.discard(request_id)
                self.worker.send(("cancel", rid))
                self.breaker.release()
                self.bus.publish("request", id=request_id, phase="cancelled")

    async def _admit(self):
        if self.state in ("loading", "restarting") and self.breaker.state != "open":
            try:
                await asyncio.wait_for(self._ready.wait(), self.RESTART_WAIT)
            except TimeoutError:
                pass
        if self.state != "ready":
            raise EngineUnavailable(f"the engine is {self.state}", "down", self.RESTART_BACKOFF[-1])
        if len(self._streams) >= self.config.max_concurrency + self.config.max_queue:
            raise EngineUnavailable(
                f"the server is at capacity ({len(self._streams)} requests running or queued)", "busy"
            )
        if not self.breaker.allow():
            raise EngineUnavailable(
                "the engine failed repeatedly; the circuit breaker is open",
                "breaker",
                self.breaker.next_probe_s() or 1.0,
            )

    async def count_tokens(self, request: Request) -> int | Error:
        return await self._call("count", request)

    async def stats(self) -> dict:
        return await self._call("stats")

    async def _call(self, kind: str, *args):
        if self.state != "ready":
            raise EngineUnavailable(f"the engine is {self.state}", "down")
        rid = next(self._ids)
        reply = self._replies[rid] = asyncio.get_running_loop().create_future()
        try:
            self.worker.send((kind, rid, *args))
            return await reply
        finally:
            del self._replies[rid]

    def _observe(self, request_id: str, event: Event, transcript: Transcript | None):
        """Count the event, settle the breaker, record the transcript, publish the lifecycle step."""
        self.metrics.observe(event)
        if transcript:
            self.transcripts.record(transcript, event)
        publish = self.bus.publish
        if isinstance(event, Started):
            publish("request", id=request_id, phase="prefill", prompt_tokens=event.prompt_tokens,
                    cached_tokens=event.cached_tokens, constraint=event.constraint)
        elif isinstance(event, PrefillProgress):
            publish("request", id=request_id, phase="prefill", done=event.done, total=event.total)
        elif isinstance(event, (TextDelta, ToolCallEnd)) and request_id not in self._generating:
            self._generating.add(request_id)
            publish("request", id=request_id, phase="generating")
        elif isinstance(event, Done):
            self.breaker.success()
            self._generating.discard(request_id)
            publish("request", id=request_id, phase="done", stop_reason=event.stop_reason, note=event.note,
                    prompt_tokens=event.usage.prompt_tokens, cached_tokens=event.usage.cached_tokens,
                    generated_tokens=event.usage.generated_tokens,
                    ttft_s=event.timings.queued_s + event.timings.prefill_s, decode_s=event.timings.decode_s)
        elif isinstance(event, Error):
            if event.kind != "engine":
                self.breaker.release()
            self._generating.discard(request_id)
            self.metrics.failures.labels(event.kind).inc()
            publish("request", id=request_id, phase="error", error_kind=event.kind, message=event.message)

    def _dispatch(self, message: tuple):
        kind = message[0]
        self._last_progress = time.monotonic()
        if kind == "events":
            for rid, event in message[1]:
                if stream := self._streams.get(rid):
                    stream.put_nowait(event)
        elif kind == "reply":
            if (reply := self._replies.get(message[1])) and not reply.done():
                reply.set_result(message[2])
        elif kind == "failure":
            self._engine_failure(message[1])
        elif kind == "progress":
            self.on_progress(message[1], message[2])
            self.bus.publish("worker", state="loading", phase=message[1], fraction=message[2])
        elif kind == "ready":
            self.info = message[1]
            self._set_state("ready")
            self._ready.set()
        elif kind == "fatal":
            self._fatal = message[1]
            if self.worker.group:
                self.worker.kill()  # mlx.launch would wait on the other ranks

    def _engine_failure(self, reason: str):
        self.breaker.failure()
        self.bus.publish("worker", state=self.state, failure=reason, pid=self.pid, restarts=self.restarts)

    def _worker_output(self, line: str):
        """The worker's stderr, for the log: published on the bus and logged (stderr in --serve mode)."""
        if line.startswith(HEARTBEAT):
            self._heartbeat(line)
            return
        log.warning("worker: %s", line)
        self.bus.publish("log", source="worker", line=line)
        if (ended := RANK_ENDED.search(line)) and self._lost_rank is None:
            self._lost_rank = int(ended[1])
            if self.state == "ready":  # the other ranks would wait for it, idle or not: restart the group now
                self.worker.kill()

    def _heartbeat(self, line: str):
        try:
            rank, cpu = line.removeprefix(HEARTBEAT).split()
            rank, cpu = int(rank), float(cpu)
        except ValueError:
            return  # a line cut by another rank's output
        now = time.monotonic()
        when, last_cpu, share = self._beats.get(rank, (now, cpu, None))
        self._beats[rank] = (now, cpu, (cpu - last_cpu) / (now - when) if now > when else share)

    def _exited(self, code: int):
        self._exit_code = code
        self._exit.set()

    def _set_state(self, state: str, **data):
        self.state = state
        if state != "ready":
            self._ready.clear()
        self.bus.publish("worker", state=state, pid=self.pid, restarts=self.restarts, **data)

    def _breaker_changed(self, state: str):
        self.metrics.breaker.set(BREAKER_STATES[state])
        self.bus.publish("breaker", **self.breaker.snapshot() | {"state": state})

    def _fail_in_flight(self, message: str):
        for stream in self._streams.values():
            stream.put_nowait(Error("engine", message))
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(EngineUnavailable(message, "down"))

    async def _launch(self) -> bool:
        """Start a worker and wait for its model; False (with `_fatal` set) if that failed."""
        self._set_state("loading")
        self._exit.clear()
        self._fatal = None
        self._lost_rank = None
        self._beats.clear()
        started = await self.worker.start(self.config)
        if started:
            ready = asyncio.ensure_future(self._ready.wait())
            exited = asyncio.ensure_future(self._exit.wait())
            await asyncio.wait([ready, exited], return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            exited.cancel()
        if self.state == "ready":
            return True
        code = await self.worker.wait(10)
        if self._lost_rank is not None and not self._fatal:
            host = self._hosts[self._lost_rank]
            self._fatal = f"rank {self._lost_rank} ({host}) of the worker group ended before the group was ready"
        self._fatal = self._fatal or f"the engine worker exited with code {code} before it was ready"
        self._set_state("failed", message=self._fatal)
        return False

    async def _supervise(self):
        """Restart the worker whenever it exits, failing what was in flight, with backoff."""
        failures = 0
        while True:
            await self._exit.wait()
            reason = "stalled" if self._stalled else f"exited (code {self._exit_code})"
            if self._stalled and len(self._beats) > 1:  # name the rank heard from least recently
                rank, (when, _, _) = min(self._beats.items(), key=lambda item: item[1][0])
                reason += f": rank {rank} ({self._hosts[rank]}) silent for {time.monotonic() - when:.1f} s"
            if self._lost_rank is not None:
                reason += f": rank {self._lost_rank} ({self._hosts[self._lost_rank]}) ended"
            self._stalled = False
            self._engine_failure(f"the worker {reason}")
            self._set_state("restarting", exit_code=self._exit_code)
            self.metrics.restarts.inc()
            self._fail_in_flight(f"the engine worker {reason}; it is being restarted")
            await asyncio.sleep(self.RESTART_BACKOFF[min(failures, len(self.RESTART_BACKOFF) - 1)])
            self.restarts += 1
            failures = 0 if await self._launch() else failures + 1

    async def _watchdog(self):
        """Kill a worker that has work but has sent nothing (no token, no prefill step) for too long."""
        timeout = self.config.stall_timeout
        while True:
            await asyncio.sleep(min(timeout / 4, 1.0))
            if self.state != "ready" or not (self._streams or self._replies):
                self._last_progress = time.monotonic()
                continue
            if time.monotonic() - self._last_progress > timeout:
                self._stalled = True
                self.worker.kill()
                self._last_progress = time.monotonic()

    async def _tick(self):
        """Publish the worker's stats once a second, with throughput since the last tick."""
        previous, then = None, time.monotonic()
        while True:
            await asyncio.sleep(self.STATS_INTERVAL)
            try:
                stats = await self._call("stats")
            except EngineUnavailable:
                continue
            now = time.monotonic()
            if previous:
                elapsed = now - then
                stats["decode_tps"] = (stats["generation_tokens_total"] - previous["generation_tokens_total"]) / elapsed
                stats["prefill_tps"] = (stats["prefill_tokens_total"] - previous["prefill_tokens_total"]) / elapsed
            previous, then = stats, now
            self.metrics.running.set(stats["running"])
            self.metrics.waiting.set(stats["waiting"])
            self.metrics.cache_bytes.labels("ram").set(stats["cache"]["ram_bytes"])
            self.metrics.cache_bytes.labels("disk").set(stats["cache"]["disk_bytes"])
            self.metrics.cache_bytes.labels("snapshots").set(stats["cache"]["snapshot_bytes"])
            self.metrics.cache_snapshots.set(stats["cache"]["snapshots"])
            self.metrics.observe_stats(stats, self.pid)
            self.last_stats = stats
            self.bus.publish("stats", **stats, breaker=self.breaker.snapshot(), state=self.state,
                             restarts=self.restarts, pid=self.pid, rank_states=self.rank_states())
