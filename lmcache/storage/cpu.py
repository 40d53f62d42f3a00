"""The CPU hot cache: an LRU index over pool slots.

Not locked by itself: the storage manager's lock guards it, because eviction, pinning and
promotion must be atomic with the pool's reference counts.
"""

from __future__ import annotations

from collections import OrderedDict

from lmcache.memory.pool import ChunkBuffer


class CpuCache:
    """Key -> buffer, least recently used first. The index holds one reference per entry."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, ChunkBuffer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def touch(self, key: str) -> ChunkBuffer | None:
        """The buffer for ``key``, marked most recently used."""
        buffer = self._entries.get(key)
        if buffer is not None:
            self._entries.move_to_end(key)
        return buffer

    def insert(self, key: str, buffer: ChunkBuffer) -> None:
        """Index ``buffer``; the caller's reference becomes the index's."""
        self._entries[key] = buffer

    def evict_lru(self) -> ChunkBuffer | None:
        """Remove the least recently used entry nobody else holds; None if all are pinned."""
        for key, buffer in self._entries.items():
            if buffer.refs == 1:
                del self._entries[key]
                return buffer
        return None

    def keys_lru_first(self) -> list[str]:
        return list(self._entries)
