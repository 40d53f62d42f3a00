"""Circuit breaker transitions, with a hand-driven clock instead of waiting."""

from __future__ import annotations

from lmcache.storage.remote.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[CircuitBreaker, Clock, list[tuple[bool, str]]]:
    clock = Clock()
    events: list[tuple[bool, str]] = []
    breaker = CircuitBreaker(3, 5.0, lambda is_open, why: events.append((is_open, why)), clock)
    return breaker, clock, events


def test_opens_after_consecutive_failures_only() -> None:
    breaker, _, events = make()
    breaker.failure("a")
    breaker.failure("b")
    breaker.success()
    breaker.failure("c")
    breaker.failure("d")
    assert breaker.allow() and not events
    breaker.failure("e")
    assert events == [(True, "e")]
    assert not breaker.allow()


def test_one_probe_after_backoff_then_close_or_reopen() -> None:
    breaker, clock, events = make()
    breaker.trip("down")
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.allow(), "the probe"
    assert not breaker.allow(), "only one probe at a time"
    breaker.failure("still down")
    assert not breaker.allow(), "a failed probe restarts the back-off"
    assert events == [(True, "down")], "logged once, not per failure"
    clock.now += 5.1
    assert breaker.allow()
    breaker.success()
    assert events[-1][0] is False
    assert breaker.allow() and breaker.allow()
