"""The circuit breaker as a state machine, on a clock the test turns."""

from mlx_tui.engine.breaker import CircuitBreaker


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(**kwargs):
    clock = Clock()
    changes = []
    b = CircuitBreaker(clock=clock, on_change=changes.append, **kwargs)
    return b, clock, changes


def test_opens_after_consecutive_failures_only():
    b, _, changes = breaker(threshold=3)
    b.failure()
    b.failure()
    b.success()
    b.failure()
    b.failure()
    assert b.state == "closed" and b.allow()
    b.failure()
    assert b.state == "open" and not b.allow()
    assert changes == ["open"]


def test_half_open_admits_one_probe_and_closes_on_success():
    b, clock, changes = breaker(threshold=1, cooldown=5)
    b.failure()
    assert b.next_probe_s() == 5
    clock.now += 4
    assert not b.allow() and b.next_probe_s() == 1
    clock.now += 1
    assert b.state == "half_open" and b.next_probe_s() is None
    assert b.allow() and not b.allow(), "only one probe at a time"
    b.success()
    assert b.state == "closed" and b.failures == 0
    assert changes == ["open", "half_open", "closed"]


def test_failed_probe_reopens_with_a_longer_capped_cooldown():
    b, clock, _ = breaker(threshold=1, cooldown=5, max_cooldown=12)
    b.failure()
    for expected in (10, 12, 12):
        clock.now += b.cooldown
        assert b.allow()
        b.failure()
        assert b.state == "open" and b.cooldown == expected


def test_released_probe_lets_another_in():
    b, clock, _ = breaker(threshold=1, cooldown=1)
    b.failure()
    clock.now += 1
    assert b.allow()
    b.release()
    assert b.allow()


def test_snapshot_has_the_health_fields():
    b, _, _ = breaker(threshold=2)
    b.failure()
    assert b.snapshot() == {"state": "closed", "failures": 1, "next_probe_s": None}
