"""What the scheduler-side connector shares with an in-process worker: its engine and pins.

vLLM builds the worker-side connector (which owns the engine and vLLM's KV tensors) before the
scheduler-side one; with the default uniprocess executor (TP=1) both live in the EngineCore
process, so the scheduler looks up and pins chunks on the worker's engine directly. Pins
taken at scheduling time keep chunks from being evicted before the worker loads them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from lmcache.engine import LMCacheEngine
from lmcache.keys import ChunkRange, Tokens
from lmcache.memory.pool import ChunkBuffer


def chunks_to_load(engine: LMCacheEngine, hit_tokens: Tokens, start: int) -> list[ChunkRange]:
    """The chunks of the cached prefix ``hit_tokens`` that hold tokens at or after ``start``
    (vLLM already has the ones before)."""
    return [c for c in engine.chunks(hit_tokens) if c.end > start]


class PinTable:
    """Chunk buffers pinned for a request until the worker takes them or the request goes."""

    def __init__(self, engine: LMCacheEngine) -> None:
        self._engine = engine
        self._pins: dict[str, list[ChunkBuffer]] = {}
        self._lock = threading.Lock()

    def pin(self, request_id: str, tokens: Tokens, start: int) -> None:
        """Pin the CPU-resident prefix of the chunks a load will read (no I/O: this runs in
        the scheduler loop). Replaces the request's earlier pins."""
        keys = [c.key for c in chunks_to_load(self._engine, tokens, start)]
        buffers = self._engine.storage.pin_cpu_prefix(keys)
        self.drop(request_id)
        with self._lock:
            self._pins[request_id] = buffers

    def take(self, request_id: str) -> list[ChunkBuffer]:
        """The request's pinned buffers, now owned (and released) by the caller."""
        with self._lock:
            return self._pins.pop(request_id, [])

    def drop(self, request_id: str) -> None:
        """Release a request's pins (aborted, preempted or finished before its load)."""
        for buffer in self.take(request_id):
            self._engine.storage.release(buffer)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._pins.values())

    def clear(self) -> None:
        with self._lock:
            requests = list(self._pins)
        for request_id in requests:
            self.drop(request_id)


@dataclass
class SharedEngine:
    engine: LMCacheEngine
    pins: PinTable = field(init=False)

    def __post_init__(self) -> None:
        self.pins = PinTable(self.engine)


_registry: dict[tuple[str, int], SharedEngine] = {}
_registry_lock = threading.Lock()


def publish(instance_id: str, rank: int, engine: LMCacheEngine) -> SharedEngine:
    """Make a worker's engine visible to a scheduler in the same process."""
    shared = SharedEngine(engine)
    with _registry_lock:
        _registry[(instance_id, rank)] = shared
    return shared


def withdraw(instance_id: str, rank: int) -> None:
    with _registry_lock:
        shared = _registry.pop((instance_id, rank), None)
    if shared is not None:
        shared.pins.clear()


def find(instance_id: str, rank: int = 0) -> SharedEngine | None:
    """The in-process engine of ``rank`` for this vLLM instance, if any."""
    with _registry_lock:
        return _registry.get((instance_id, rank))
