"""A circuit breaker: after repeated failures the remote tier is skipped, then probed.

Without it every request would wait out the deadline against a dead server. While open, calls
are refused at once; after the back-off exactly one call (the probe) is let through, and its
outcome closes the breaker or restarts the back-off.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

StateListener = Callable[[bool, str], None]
"""Called with (open, reason) on every transition, outside the lock."""


class CircuitBreaker:
    """Thread-safe; ``clock`` is injectable so back-off can be tested without waiting."""

    def __init__(
        self,
        failure_threshold: int,
        backoff_s: float,
        on_change: StateListener,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = failure_threshold
        self._backoff = backoff_s
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def allow(self) -> bool:
        """May a call go to the server now? True also hands out the single probe."""
        with self._lock:
            if self._open_until is None:
                return True
            if self._probing or self._clock() < self._open_until:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            self._probing = False
            if self._open_until is None:
                return
            self._open_until = None
        self._on_change(False, "a probe succeeded")

    def failure(self, reason: str) -> None:
        with self._lock:
            self._failures += 1
            was_open = self._open_until is not None
            if not was_open and self._failures < self._threshold:
                return
            self._probing = False
            self._open_until = self._clock() + self._backoff
        if not was_open:
            self._on_change(True, reason)

    def trip(self, reason: str) -> None:
        """Open at once (the server is known to be unreachable, e.g. at start-up)."""
        with self._lock:
            was_open = self._open_until is not None
            self._failures = max(self._failures, self._threshold)
            self._probing = False
            self._open_until = self._clock() + self._backoff
        if not was_open:
            self._on_change(True, reason)
