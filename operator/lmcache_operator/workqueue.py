"""A deduplicating work queue (client-go's model) for reconcile keys.

Many watch events about one deployment (a rollout emits dozens) collapse into one pending
key; a key is never reconciled by two workers at once; a key that changes while being
worked on is queued once more afterwards. A fixed number of workers bounds the load that
a start-up with hundreds of deployments puts on the API server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, TypeVar

from lmcache_operator import metrics

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
        self._ready: asyncio.Queue[K] = asyncio.Queue()
        self._pending: set[K] = set()
        self._active: set[K] = set()
        self._dirty: set[K] = set()
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._failures: dict[Hashable, int] = {}

    def add(self, key: K) -> None:
        """Queue `key` unless it already waits; if a worker has it, queue it again after."""
        if key in self._active:
            self._dirty.add(key)
            return
        if key in self._pending:
            return
        timer = self._timers.pop(key, None)
        if timer:
            timer.cancel()
        self._pending.add(key)
        self._ready.put_nowait(key)
        metrics.QUEUE_DEPTH.set(len(self._pending))

    def add_after(self, key: K, delay: float) -> None:
        """Queue `key` in `delay` seconds; an earlier scheduled add wins."""
        loop = asyncio.get_running_loop()
        existing = self._timers.get(key)
        if existing and existing.when() <= loop.time() + delay:
            return
        if existing:
            existing.cancel()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def retry(self, key: K, base: float = 1.0, cap: float = 300.0) -> float:
        """Requeue a failed key with per-key exponential backoff; returns the delay."""
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        delay = min(base * 2**n, cap)
        self.add_after(key, delay)
        return delay

    def succeeded(self, key: K) -> None:
        self._failures.pop(key, None)

    def forget(self, key: K) -> None:
        """Drop every trace of `key` (its object was deleted)."""
        timer = self._timers.pop(key, None)
        if timer:
            timer.cancel()
        self._failures.pop(key, None)
        self._dirty.discard(key)

    async def get(self) -> K:
        key = await self._ready.get()
        self._pending.discard(key)
        self._active.add(key)
        metrics.QUEUE_DEPTH.set(len(self._pending))
        return key

    def done(self, key: K) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def __len__(self) -> int:
        return len(self._pending)
