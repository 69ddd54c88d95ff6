"""How often the worker sends a running stream's text.

On the CPU backend the model's BLAS threads fill every core, so each message the worker sends
takes a core from them: the front process and the client wake for it. Sending a decoding
stream's pieces once an interval rather than once a token lets a stream cost a few wake-ups a
second instead of one a token. On a GPU the cores are free while the model computes, so every
step's pieces go out at once.
"""

import time
from collections.abc import Callable

from .events import STREAMED, Event, RawText, coalesced

Tagged = tuple[str, Event]


class Pacer:
    """Holds the pieces of decoding streams until `interval` seconds have passed since the last send.

    Whatever else a step brings (a stream's first piece, a tool call's start or end, prefill
    progress, the end of a request) goes out at once, with everything held before it; so does
    everything while a request waits for its prefill, whose next step may be a long one.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.held: list[Tagged] = []
        self.sent_at = 0.0
        self.streaming: set[str] = set()  # requests with pieces in the last send: their next ones may wait

    def take(self, events: list[Tagged], decoding: Callable[[], bool]) -> list[Tagged]:
        """What to send now of what was held and this step's `events`; `decoding()`: the next step only decodes."""
        if not self.interval:
            return events
        self.held += events
        if (
            time.monotonic() - self.sent_at < self.interval
            and all(isinstance(e, RawText) or (isinstance(e, STREAMED) and rid in self.streaming) for rid, e in events)
            and decoding()
        ):
            return []
        out = coalesced(self.held)
        self.held = []
        self.streaming = {rid for rid, e in out if isinstance(e, STREAMED)}
        self.sent_at = time.monotonic()
        return out
