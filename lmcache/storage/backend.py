"""The seam between the storage manager and the tiers below the CPU hot cache.

A backend (local disk, Valkey/Redis) stores chunk KV under chunk-key strings. It never raises
for a miss, a corrupt value or an unreachable server: those are misses and metrics, so a broken
tier slows nothing down and crashes nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Protocol

from lmcache.memory.pool import ChunkBuffer

WriteDone = Callable[[], None]


class TierListener(Protocol):
    """Told when a chunk lands in or leaves a tier of this engine (the vLLM connector turns
    that into KV events for routers). ``tag`` is a chunk's description, kept in the disk
    tier's file header so that it survives a restart."""

    def landed(self, key: str, tier: str, tag: bytes = b"") -> None: ...

    def left(self, key: str, tier: str) -> None: ...

    def tag(self, key: str) -> bytes: ...

    def settled(self, key: str) -> None:
        """Every write-back of ``key`` has finished (written, failed or dropped): whatever
        it did not land in will not get it."""


class StorageBackend(ABC):
    """A lower tier. Implementations must be thread-safe."""

    name: str

    @abstractmethod
    def contains_prefix(self, keys: Sequence[str]) -> int:
        """How many of ``keys``, from the first, this tier holds (one round trip at most)."""

    @abstractmethod
    def load_prefix(self, keys: Sequence[str], buffers: Sequence[ChunkBuffer]) -> int:
        """Fill ``buffers[i]`` with the KV of ``keys[i]``, from the first, stopping at the first
        miss or invalid value; returns how many were filled.

        Each buffer's ``num_tokens`` is the token count its chunk must hold: a value that
        holds another count is invalid (a short value would leave the rest of the chunk as
        whatever the slot held before). Buffers past the returned count hold undefined bytes.
        """

    @abstractmethod
    def submit(self, key: str, buffer: ChunkBuffer, done: WriteDone) -> None:
        """Write ``buffer`` under ``key`` in the background.

        ``done`` is called exactly once, from any thread, when the buffer may be reused:
        after the write, its failure, or a drop because the queue is full.
        """

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until submitted writes are finished; False on timeout."""
        return True

    @abstractmethod
    def close(self) -> None:
        """Stop background work; pending writes are finished or released."""
