"""The front process's event bus: engine-wide events for the dashboard and `GET /v1/events`."""

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator


class EventBus:
    """Publishes dicts `{"kind", "time", ...}` to every subscriber; a slow subscriber loses its oldest.

    Kinds: "stats" (once a second), "request" (one per lifecycle step), "worker"
    (loading, ready, restarting, exited), "breaker" (state changes), "transcript".
    """

    def __init__(self, history: int = 200, backlog: int = 1000) -> None:
        self.recent: deque[dict] = deque(maxlen=history)
        self.backlog = backlog
        self._subscribers: set[asyncio.Queue] = set()

    def publish(self, kind: str, **data) -> dict:
        event = {"kind": kind, "time": time.time(), **data}
        self.recent.append(event)
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)
        return event

    async def subscribe(self, replay: bool = False) -> AsyncIterator[dict]:
        """Events from now on (after the recent ones, with `replay`), until the caller stops."""
        queue: asyncio.Queue = asyncio.Queue(self.backlog)
        for event in self.recent if replay else ():
            queue.put_nowait(event)
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)
