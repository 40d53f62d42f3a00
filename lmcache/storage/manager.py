"""The storage manager: CPU hot cache in front, disk and remote behind, one pool for all.

Lookups walk CPU -> disk -> remote; lower-tier hits are loaded into pool slots and promoted to
the CPU cache; stores land in the CPU cache and are written through to the lower tiers in the
background. When a slot is needed, unpinned CPU entries are evicted least-recently-used first,
so the pool never runs out while anything is evictable, and a store that cannot get room is
skipped and counted, never raised.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import torch

from lmcache.config import LMCacheEngineConfig
from lmcache.keys import ChunkRange
from lmcache.memory.pool import ChunkBuffer, MemoryPool
from lmcache.metrics import EngineMetrics
from lmcache.spec import KVSpec
from lmcache.storage.backend import StorageBackend
from lmcache.storage.cpu import CpuCache
from lmcache.storage.disk import DiskBackend

logger = logging.getLogger("lmcache")

Fill = Callable[[ChunkRange, torch.Tensor], None]
"""Writes the KV of one chunk into the given ``[layers, kv, n, heads, head]`` view."""

Reserved = list[tuple[ChunkRange, ChunkBuffer]]
"""Chunks and the private pool slots reserved for them, awaiting commit or abort."""


def build_lower_tiers(
    config: LMCacheEngineConfig, spec: KVSpec, metrics: EngineMetrics, shard: str
) -> list[StorageBackend]:
    """The configured tiers below the CPU cache, fastest first.

    ``shard`` names this engine's own folder under ``local_disk``: TP ranks (and models) of one
    pod share the volume, and each disk tier indexes, budgets and evicts only its own files.
    """
    tiers: list[StorageBackend] = []
    disk_path = config.local_disk_path
    if disk_path is not None and config.max_local_disk_bytes > 0:
        tiers.append(
            DiskBackend(
                disk_path / shard, config.max_local_disk_bytes, spec, config.chunk_size, metrics
            )
        )
    if config.remote_url:
        from lmcache.storage.remote import create_remote_backend

        tiers.append(create_remote_backend(config, spec, metrics))
    return tiers


class StorageManager:
    def __init__(
        self,
        config: LMCacheEngineConfig,
        spec: KVSpec,
        metrics: EngineMetrics,
        shard: str,
        lower: Sequence[StorageBackend] | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        # Tiers first: their config errors (bad URL, refused credentials) must surface before
        # the pool pins gigabytes.
        self.lower = (
            list(lower) if lower is not None else build_lower_tiers(config, spec, metrics, shard)
        )
        try:
            self.pool = MemoryPool(config, spec)
        except BaseException:
            for tier in self.lower:
                tier.close()
            raise
        self.cpu = CpuCache()
        self._lock = threading.Lock()
        metrics.labels(metrics.pool_total_bytes).set(self.pool.capacity)

    # -- slots ---------------------------------------------------------------------------

    def _allocate(self, num_tokens: int) -> ChunkBuffer | None:
        """A slot, evicting LRU CPU entries as needed; None when everything is pinned."""
        while (buffer := self.pool.allocate(num_tokens)) is None:
            with self._lock:
                victim = self.cpu.evict_lru()
                if victim is None:
                    return None
                victim.refs -= 1
            self.pool.free(victim)
            self.metrics.labels(self.metrics.evictions, "cpu").inc()
        return buffer

    def release(self, buffer: ChunkBuffer) -> None:
        """Drop one reference; the slot returns to the pool with the last one."""
        with self._lock:
            buffer.refs -= 1
            last = buffer.refs == 0
        if last:
            self.pool.free(buffer)
        self._update_gauges()

    def _update_gauges(self) -> None:
        m = self.metrics
        m.labels(m.pool_used_bytes).set(self.pool.used_bytes)
        m.labels(m.cpu_cached_chunks).set(len(self.cpu))

    # -- store ---------------------------------------------------------------------------

    def _stored_check(self, chunks: Sequence[ChunkRange]) -> Callable[[int, str], bool]:
        """Whether the chunk at a position needs no store. With the CPU cache, asked per chunk
        (cheap, and current even as this store's own allocations evict); staging-only, the
        first lower tier is asked once for the request's whole run (one round trip to a remote
        tier, not one per chunk)."""
        if self.config.local_cpu:

            def in_cpu(position: int, key: str) -> bool:
                with self._lock:
                    return key in self.cpu

            return in_cpu
        held = self.lower[0].contains_prefix([c.key for c in chunks])
        return lambda position, key: position < held

    def store(self, chunks: Sequence[ChunkRange], fill: Fill) -> int:
        """Store the chunks not stored yet; returns the tokens newly stored.

        :meth:`reserve`, ``fill`` each slot, :meth:`commit`; a failing ``fill`` aborts the
        reservation (slots back to the pool) and propagates.
        """
        reserved = self.reserve(chunks)
        try:
            for chunk, buffer in reserved:
                fill(chunk, buffer.kv())
        except BaseException:
            self.abort(reserved)
            raise
        return self.commit(reserved)

    def reserve(self, chunks: Sequence[ChunkRange]) -> Reserved:
        """Phase one of a store: a private pool slot for each chunk not stored yet.

        The slots are invisible to lookups and never evicted until :meth:`commit` or
        :meth:`abort`, so a caller can fill many of them asynchronously (e.g. one batch of
        device-to-host copies) and publish them only once their bytes are complete. Stops at
        the first chunk that cannot get a slot: later chunks of the same prefix could never
        be hit without it.
        """
        if not self.config.local_cpu and not self.lower:
            return []  # the pool is staging only and nothing lies below it
        reserved: Reserved = []
        already_stored = self._stored_check(chunks)
        for position, chunk in enumerate(chunks):
            if already_stored(position, chunk.key):
                continue
            buffer = self._allocate(chunk.num_tokens)
            if buffer is None:
                self.metrics.labels(self.metrics.skipped_stores).inc(len(chunks) - position)
                break
            reserved.append((chunk, buffer))
        self._update_gauges()
        return reserved

    def commit(self, reserved: Reserved) -> int:
        """Phase two: publish filled slots to the CPU cache and write them through to the
        lower tiers; returns the tokens newly stored (a chunk a concurrent store published
        first is dropped)."""
        stored = 0
        for chunk, buffer in reserved:
            if not self._commit(chunk.key, buffer):
                continue
            stored += chunk.num_tokens
            self.metrics.labels(self.metrics.stored_bytes).inc(buffer.nbytes)
        self.metrics.labels(self.metrics.stored_tokens).inc(stored)
        self._update_gauges()
        return stored

    def abort(self, reserved: Reserved) -> None:
        """Give reserved slots back to the pool unpublished (their fill failed)."""
        for _, buffer in reserved:
            self.release(buffer)

    def _commit(self, key: str, buffer: ChunkBuffer) -> bool:
        """Publish a filled buffer to the CPU cache and the lower tiers; False if a concurrent
        store won the race.

        The write-back references are taken under the same lock as the publication: once the
        buffer is in the CPU index another thread may evict it, and a slot reused before its
        write-back ran would put another chunk's bytes on disk under this key.
        """
        with self._lock:
            if self.config.local_cpu:
                if key in self.cpu:
                    buffer.refs -= 1
                    if buffer.refs == 0:
                        self.pool.free(buffer)
                    return False
                self.cpu.insert(key, buffer)  # the caller's reference becomes the index's
            buffer.refs += len(self.lower)
        for tier in self.lower:
            tier.submit(key, buffer, lambda: self.release(buffer))
        if not self.config.local_cpu:
            self.release(buffer)
        return True

    # -- lookup and load -----------------------------------------------------------------

    def cpu_prefix(self, keys: Sequence[str]) -> int:
        with self._lock:
            for i, key in enumerate(keys):
                if key not in self.cpu:
                    return i
            return len(keys)

    def lookup(self, keys: Sequence[str]) -> tuple[int, int]:
        """(chunks found in any tier from the first, of which in CPU)."""
        found = in_cpu = self.cpu_prefix(keys)
        for tier in self.lower:
            if found == len(keys):
                break
            found += tier.contains_prefix(keys[found:])
        return found, in_cpu

    def acquire(self, keys: Sequence[str]) -> list[ChunkBuffer]:
        """Pinned buffers for the longest loadable prefix of ``keys``; release each after use.

        CPU hits are pinned in place; lower-tier hits are loaded into fresh slots and promoted
        to the CPU cache (or kept as staging buffers with ``local_cpu: false``).
        """
        acquired = self.pin_cpu_prefix(keys)
        if len(acquired) < len(keys):
            acquired += self._load_lower(keys[len(acquired) :])
        self._update_gauges()
        return acquired

    def _load_lower(self, keys: Sequence[str]) -> list[ChunkBuffer]:
        """Load a prefix of ``keys`` from the lower tiers, one batch per tier."""
        loaded: list[ChunkBuffer] = []
        for tier in self.lower:
            pending = keys[len(loaded) :]
            if not pending:
                break
            available = tier.contains_prefix(pending)
            if available == 0:
                continue
            buffers = self._allocate_many(available)
            got = tier.load_prefix(pending[: len(buffers)], buffers) if buffers else 0
            for buffer in buffers[got:]:
                self.release(buffer)
            self.metrics.labels(self.metrics.tier_hits, tier.name).inc(got)
            for key, buffer in zip(pending[:got], buffers[:got], strict=True):
                loaded.append(self._promote(key, buffer))
            if got < available:
                break
        return loaded

    def _allocate_many(self, count: int) -> list[ChunkBuffer]:
        buffers = []
        for _ in range(count):
            buffer = self._allocate(self.config.chunk_size)
            if buffer is None:
                break
            buffers.append(buffer)
        return buffers

    def _promote(self, key: str, buffer: ChunkBuffer) -> ChunkBuffer:
        """Put a loaded buffer in the CPU cache; returns the pinned buffer to read from."""
        if not self.config.local_cpu:
            return buffer
        with self._lock:
            existing = self.cpu.touch(key)
            if existing is None:
                buffer.refs += 1  # the index's reference; the caller keeps its pin
                self.cpu.insert(key, buffer)
                return buffer
            existing.refs += 1
        self.release(buffer)
        return existing

    def pin_cpu_prefix(self, keys: Sequence[str]) -> list[ChunkBuffer]:
        """Pin the CPU-resident prefix of ``keys`` without touching lower tiers."""
        pinned: list[ChunkBuffer] = []
        with self._lock:
            for key in keys:
                buffer = self.cpu.touch(key)
                if buffer is None:
                    break
                buffer.refs += 1
                pinned.append(buffer)
        return pinned

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for background write-through to every lower tier."""
        return all(tier.flush(timeout) for tier in self.lower)

    def close(self) -> None:
        for tier in self.lower:
            tier.close()
        self.pool.close()
