"""The circuit breaker: stop sending work to an engine that keeps failing, and probe it back."""

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """closed → open after `threshold` consecutive failures → half-open after a cool-down → closed
    when the one probe admitted then succeeds, open again (with a doubled cool-down, capped) when
    it fails. `on_change(state)` is called on every transition.
    """

    def __init__(
        self,
        threshold: int = 3,
        cooldown: float = 5.0,
        max_cooldown: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.clock = clock
        self.on_change = on_change or (lambda state: None)
        self.failures = 0
        self.trips = 0
        self.opened_at = 0.0
        self.probing = False
        self._state = CLOSED

    @property
    def cooldown(self) -> float:
        return min(self.base_cooldown * 2 ** max(self.trips - 1, 0), self.max_cooldown)

    @property
    def state(self) -> str:
        if self._state == OPEN and self.clock() - self.opened_at >= self.cooldown:
            self._set(HALF_OPEN)
        return self._state

    def next_probe_s(self) -> float | None:
        """Seconds until a probe is admitted, while open."""
        if self.state != OPEN:
            return None
        return max(self.cooldown - (self.clock() - self.opened_at), 0.0)

    def allow(self) -> bool:
        """Whether a request may go to the engine now; in half-open, admits one probe."""
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.probing = False
        if self._state != CLOSED:
            self.trips = 0
            self._set(CLOSED)

    def failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self._state == HALF_OPEN or (self._state == CLOSED and self.failures >= self.threshold):
            self.trips += 1
            self.opened_at = self.clock()
            self._set(OPEN)

    def release(self) -> None:
        """The probe ended with neither success nor failure (a client error or a cancel)."""
        self.probing = False

    def snapshot(self) -> dict:
        return {"state": self.state, "failures": self.failures, "next_probe_s": self.next_probe_s()}

    def _set(self, state: str) -> None:
        self._state = state
        self.on_change(state)
