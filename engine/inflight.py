"""What the front process awaits from the worker: each request's stream of events, each query's reply."""

import asyncio
import itertools
from typing import Any

from .events import Error, Event


class EngineUnavailable(Exception):
    """The engine cannot take the request now; `retry_after` is a hint in seconds.

    `reason` is "breaker" (open circuit), "busy" (the queue is full) or "down"
    (loading, restarting, failed or stopped).
    """

    def __init__(self, message: str, reason: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class InFlight:
    """Requests by id (a queue of their events) and queries by call number (a future of their reply)."""

    def __init__(self) -> None:
        self.streams: dict[str, asyncio.Queue[Event]] = {}
        self.replies: dict[int, asyncio.Future[Any]] = {}
        self._calls = itertools.count()

    def __bool__(self) -> bool:
        return bool(self.streams or self.replies)

    def open(self, request_id: str) -> asyncio.Queue[Event]:
        queue = self.streams[request_id] = asyncio.Queue()
        return queue

    def close(self, request_id: str) -> None:
        del self.streams[request_id]

    def call(self) -> tuple[int, asyncio.Future[Any]]:
        """A new call number and the future its reply will settle; `hang_up` when done."""
        call = next(self._calls)
        reply = self.replies[call] = asyncio.get_running_loop().create_future()
        return call, reply

    def hang_up(self, call: int) -> None:
        del self.replies[call]

    def deliver(self, events: list[tuple[str, Event]]) -> None:
        for request_id, event in events:
            if stream := self.streams.get(request_id):
                stream.put_nowait(event)

    def answer(self, call: int, value: Any) -> None:
        if (reply := self.replies.get(call)) and not reply.done():
            reply.set_result(value)

    def fail(self, message: str) -> None:
        """End every stream with an engine Error and every query with EngineUnavailable."""
        for stream in self.streams.values():
            stream.put_nowait(Error("engine", message))
        for reply in self.replies.values():
            if not reply.done():
                reply.set_exception(EngineUnavailable(message, "down"))
