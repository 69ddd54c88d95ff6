"""The real scheduler run in-process, keeping each request's tokens and log-probabilities for tests to compare."""

from collections import defaultdict

import numpy as np

from mlx_tui.engine.events import Done
from mlx_tui.engine.request import GenerationRequest
from mlx_tui.engine.scheduler import Scheduler


class Recording(Scheduler):
    def __init__(self, *args):
        super().__init__(*args)
        self.tokens: dict = defaultdict(list)
        self.logprobs: dict = defaultdict(list)

    def _token(self, a, r, now):
        self.tokens[a.rid].append(r.token)
        self.logprobs[a.rid].append(np.array(r.logprobs))
        return super()._token(a, r, now)


def run(s: Recording, requests: dict) -> dict[object, list]:
    """Submit the requests (`GenerationRequest`s by id) together and step until all are done; each one's events."""
    events = defaultdict(list)
    for rid, request in requests.items():
        assert isinstance(request, GenerationRequest)
        for r, e in s.submit(rid, request):
            events[r].append(e)
    while s.busy:
        for r, e in s.step():
            events[r].append(e)
    assert all(isinstance(e[-1], Done) for e in events.values()), events
    return events
