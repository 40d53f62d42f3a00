"""The CPU hot cache: an index of pool slots with O(1) least-recently-used eviction.

Not locked by itself: the storage manager's lock guards it, because eviction, pinning and
promotion must be atomic with the pool's reference counts.

Only entries nobody but the index holds (``refs == 1``) can be evicted; they sit in an
ordered map, least recently used first, so eviction never scans past pinned entries. Callers
touch, publish and release the chunks of one prefix tail first, so a prefix's first chunk is
always its most recently used: chunks are evicted from the end of a prefix, never from its
head (a prefix without its head is unreachable weight).
"""

from __future__ import annotations

from collections import OrderedDict

from lmcache.memory.pool import ChunkBuffer


class CpuCache:
    """Key -> buffer. The index holds one reference per entry."""

    def __init__(self) -> None:
        self._entries: dict[str, ChunkBuffer] = {}
        self._evictable: OrderedDict[str, ChunkBuffer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> ChunkBuffer | None:
        return self._entries.get(key)

    def insert(self, key: str, buffer: ChunkBuffer) -> None:
        """Index ``buffer`` (the caller's reference becomes the index's) as most recent."""
        buffer.key = key
        self._entries[key] = buffer
        self.held_changed(buffer)

    def touch(self, buffer: ChunkBuffer) -> None:
        """Mark an indexed, evictable entry most recently used."""
        if buffer.key is not None and buffer.key in self._evictable:
            self._evictable.move_to_end(buffer.key)

    def held_changed(self, buffer: ChunkBuffer) -> None:
        """Call after changing an indexed buffer's ``refs``: it is evictable (as most recent)
        exactly while the index is its only holder."""
        key = buffer.key
        if key is None or self._entries.get(key) is not buffer:
            return
        if buffer.refs == 1:
            self._evictable[key] = buffer
            self._evictable.move_to_end(key)
        else:
            self._evictable.pop(key, None)

    def evict_lru(self) -> tuple[str, ChunkBuffer] | None:
        """Remove the least recently used entry nobody else holds and return it with its key;
        None if every entry is held."""
        if not self._evictable:
            return None
        key, buffer = self._evictable.popitem(last=False)
        del self._entries[key]
        buffer.key = None
        return key, buffer

    def keys_lru_first(self) -> list[str]:
        """Evictable keys in eviction order (held entries are not in it)."""
        return list(self._evictable)
