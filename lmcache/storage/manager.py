"""The storage manager: CPU hot cache in front, disk and remote behind, one pool for all.

Lookups walk CPU -> disk -> remote; lower-tier hits are loaded into pool slots and promoted to
the CPU cache; stores land in the CPU cache and are written through to the lower tiers in the
background. When a slot is needed, unpinned CPU entries are evicted least-recently-used first,
so the pool never runs out while anything is evictable, and a store that cannot get room is
skipped and counted, never raised.

Every holder of a slot (the CPU index, a load in flight, a write-back) holds one reference;
the slot returns to the pool with the last one, on every path including exceptions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch

from lmcache.config import LMCacheEngineConfig
from lmcache.keys import ChunkRange
from lmcache.memory.pool import ChunkBuffer, MemoryPool
from lmcache.metrics import EngineMetrics
from lmcache.spec import KVSpec
from lmcache.storage.backend import StorageBackend, TierListener
from lmcache.storage.cpu import CpuCache
from lmcache.storage.disk import DiskBackend

logger = logging.getLogger("lmcache")

Fill = Callable[[ChunkRange, torch.Tensor], None]
"""Writes the KV of one chunk into the given ``[layers, kv, n, heads, head]`` view."""

Reserved = list[tuple[ChunkRange, ChunkBuffer]]
"""Chunks and the private pool slots reserved for them, awaiting commit or abort."""


def build_lower_tiers(
    config: LMCacheEngineConfig,
    spec: KVSpec,
    metrics: EngineMetrics,
    shard: str,
    listener: TierListener | None = None,
) -> list[StorageBackend]:
    """The configured tiers below the CPU cache, fastest first.

    ``shard`` names this engine's own folder under ``local_disk``: TP ranks (and models) of one
    pod share the volume, and each disk tier indexes, budgets and evicts only its own files.
    """
    tiers: list[StorageBackend] = []
    disk_path = config.local_disk_path
    if disk_path is not None and config.max_local_disk_bytes > 0:
        tiers.append(
            DiskBackend(disk_path / shard, config.max_local_disk_bytes, spec, metrics, listener)
        )
    if config.remote_url:
        from lmcache.storage.remote import create_remote_backend

        try:
            tiers.append(create_remote_backend(config, spec, metrics))
        except BaseException:
            for tier in tiers:
                tier.close()
            raise
    return tiers


class StorageManager:
    def __init__(
        self,
        config: LMCacheEngineConfig,
        spec: KVSpec,
        metrics: EngineMetrics,
        shard: str,
        lower: Sequence[StorageBackend] | None = None,
        listener: TierListener | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.listener = listener
        # Tiers first: their config errors (bad URL, refused credentials) must surface before
        # the pool pins gigabytes.
        started = time.perf_counter()
        self.lower = (
            list(lower)
            if lower is not None
            else build_lower_tiers(config, spec, metrics, shard, listener)
        )
        tiers_s = time.perf_counter() - started
        try:
            self.pool = MemoryPool(config, spec)
        except BaseException:
            for tier in self.lower:
                tier.close()
            raise
        pool_s = time.perf_counter() - started - tiers_s
        # vLLM's own log says nothing about our start-up; pinning gigabytes takes seconds.
        logger.info(
            "LMCache start-up: lower tiers [%s] ready in %.2f s; %.2f GiB pool of %d slots "
            "(%s%s) in %.2f s",
            ", ".join(t.name for t in self.lower),
            tiers_s,
            self.pool.capacity / (1 << 30),
            self.pool.num_slots,
            "hugepages" if self.pool.hugepages else "regular pages",
            ", pinned" if self.pool.pinned else "",
            pool_s,
        )
        self.cpu = CpuCache()
        self._pending: set[str] = set()
        """Keys reserved by a store whose bytes are still on their way (not yet committed)."""
        self._lock = threading.Lock()
        metrics.pool_capacity(self.pool.capacity)

    # -- references ----------------------------------------------------------------------

    def _hold(self, buffer: ChunkBuffer) -> None:
        """One more holder (caller holds the lock)."""
        buffer.refs += 1
        self.cpu.held_changed(buffer)

    def release(self, buffer: ChunkBuffer) -> None:
        """Drop one reference; the slot returns to the pool with the last one."""
        self.release_all([buffer])

    def release_all(self, buffers: Sequence[ChunkBuffer]) -> None:
        """Release a prefix's buffers tail first, so its head ends most recently used."""
        for buffer in reversed(buffers):
            with self._lock:
                buffer.refs -= 1
                last = buffer.refs == 0
                if not last:
                    self.cpu.held_changed(buffer)
            if last:
                self.pool.free(buffer)
        self._update_gauges()

    def _allocate(self, num_tokens: int) -> ChunkBuffer | None:
        """A slot, evicting LRU CPU entries as needed; None when everything is held."""
        while (buffer := self.pool.allocate(num_tokens)) is None:
            with self._lock:
                evicted = self.cpu.evict_lru()
                if evicted is None:
                    return None
                key, victim = evicted
                victim.refs -= 1
                if self.listener is not None:  # under the lock that changed the index
                    self.listener.left(key, "cpu")
            self.pool.free(victim)
            self.metrics.evicted("cpu")
        return buffer

    def _update_gauges(self) -> None:
        self.metrics.cache_usage(self.pool.used_bytes, len(self.cpu))

    # -- store ---------------------------------------------------------------------------

    def _stored_check(self, chunks: Sequence[ChunkRange]) -> Callable[[int, str], bool]:
        """Whether the chunk at a position needs no store: already cached or being stored.
        With the CPU cache, asked per chunk (cheap, and current even as this store's own
        allocations evict); staging-only, the first lower tier is asked once for the
        request's whole run (one round trip to a remote tier, not one per chunk)."""
        if self.config.local_cpu:

            def in_cpu(position: int, key: str) -> bool:
                with self._lock:
                    return key in self.cpu or key in self._pending

            return in_cpu
        held = self._contains(self.lower[0], [c.key for c in chunks])

        def below(position: int, key: str) -> bool:
            with self._lock:
                return position < held or key in self._pending

        return below

    def store(self, chunks: Sequence[ChunkRange], fill: Fill) -> int:
        """Store the chunks not stored yet; returns the tokens newly stored.

        :meth:`reserve`, ``fill`` each slot, :meth:`commit`; a failing ``fill`` aborts the
        reservation (slots back to the pool) and propagates.
        """
        started = time.perf_counter()
        reserved = self.reserve(chunks)
        try:
            for chunk, buffer in reserved:
                fill(chunk, buffer.kv())
        except BaseException:
            self.abort(reserved)
            raise
        return self.commit(reserved, time.perf_counter() - started)

    def reserve(self, chunks: Sequence[ChunkRange]) -> Reserved:
        """Phase one of a store: a private pool slot for each chunk not stored yet.

        The slots are invisible to lookups and never evicted until :meth:`commit` or
        :meth:`abort`, so a caller can fill many of them asynchronously (e.g. one batch of
        device-to-host copies) and publish them only once their bytes are complete. A key
        reserved here is skipped by any other reservation until then. Stops at the first
        chunk that cannot get a slot: later chunks of the same prefix could never be hit
        without it.
        """
        if not self.config.local_cpu and not self.lower:
            return []  # the pool is staging only and nothing lies below it
        reserved: Reserved = []
        already_stored = self._stored_check(chunks)
        try:
            for position, chunk in enumerate(chunks):
                if already_stored(position, chunk.key):
                    continue
                buffer = self._allocate(chunk.num_tokens)
                if buffer is None:
                    self.metrics.skipped_stores(len(chunks) - position)
                    break
                reserved.append((chunk, buffer))
                with self._lock:
                    self._pending.add(chunk.key)
        except BaseException:
            self.abort(reserved)
            raise
        self._update_gauges()
        return reserved

    def commit(self, reserved: Reserved, seconds: float | None = None) -> int:
        """Phase two: publish filled slots to the CPU cache and write them through to the
        lower tiers; returns the tokens newly stored (``seconds``: how long the fill took,
        for the store-speed metrics). Published tail first, so the prefix's head is the most
        recently used."""
        stored = nbytes = 0
        for chunk, buffer in reversed(reserved):
            if not self._commit(chunk.key, buffer):
                continue
            stored += chunk.num_tokens
            nbytes += buffer.nbytes
        if reserved:
            self.metrics.store(stored, nbytes, seconds)
        self._update_gauges()
        return stored

    def abort(self, reserved: Reserved) -> None:
        """Give reserved slots back to the pool unpublished (their fill failed)."""
        for chunk, buffer in reserved:
            with self._lock:
                self._pending.discard(chunk.key)
            self.release(buffer)

    def _commit(self, key: str, buffer: ChunkBuffer) -> bool:
        """Publish a filled buffer to the CPU cache and the lower tiers; False if it was
        already there.

        The write-back references are taken under the same lock as the publication: once the
        buffer is in the CPU index another thread may evict it, and a slot reused before its
        write-back ran would put another chunk's bytes on disk under this key.
        """
        with self._lock:
            self._pending.discard(key)
            if self.config.local_cpu:
                if key in self.cpu:
                    buffer.refs -= 1
                    if buffer.refs == 0:
                        self.pool.free(buffer)
                    return False
                buffer.refs += len(self.lower)
                self.cpu.insert(key, buffer)  # the caller's reference becomes the index's
                if self.listener is not None:  # under the lock that changed the index
                    self.listener.landed(key, "cpu")
            else:
                buffer.refs += len(self.lower)
        pending = [len(self.lower)]  # write-backs of this chunk not finished yet
        for tier in self.lower:
            self._submit(tier, key, buffer, pending)
        if not self.config.local_cpu:
            self.release(buffer)
        return True

    def _submit(
        self, tier: StorageBackend, key: str, buffer: ChunkBuffer, pending: list[int]
    ) -> None:
        """Hand a write-back to a tier; its reference is released exactly once, whatever the
        tier does, and the listener hears when the chunk's last write-back is over."""
        released = threading.Event()

        def done() -> None:
            if released.is_set():
                return
            released.set()
            self.release(buffer)
            with self._lock:
                pending[0] -= 1
                last = pending[0] == 0
            if last and self.listener is not None:
                self.listener.settled(key)

        try:
            tier.submit(key, buffer, done)
        except Exception:
            logger.exception("%s tier: write-back failed to queue; not stored", tier.name)
            self.metrics.tier_error(tier.name, "write")
            done()

    # -- lookup and load -----------------------------------------------------------------

    def touch(self, keys: Sequence[str]) -> None:
        """Mark a prefix's cached chunks used, tail first: its head becomes the most recently
        used (as vLLM frees a request's blocks tail first), so it is evicted last."""
        with self._lock:
            for key in reversed(keys):
                buffer = self.cpu.get(key)
                if buffer is not None:
                    self.cpu.touch(buffer)

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
            found += self._contains(tier, keys[found:])
        return found, in_cpu

    def _contains(self, tier: StorageBackend, keys: Sequence[str]) -> int:
        """A tier's prefix count; a tier that raises (against its contract) is a miss."""
        try:
            return tier.contains_prefix(keys)
        except Exception:
            logger.exception("%s tier: lookup failed; treated as a miss", tier.name)
            self.metrics.tier_error(tier.name, "lookup")
            return 0

    def acquire(self, chunks: Sequence[ChunkRange]) -> list[ChunkBuffer]:
        """Pinned buffers for the longest loadable prefix of ``chunks``; release each after
        use (:meth:`release_all`).

        CPU hits are pinned in place; lower-tier hits are loaded into fresh slots and promoted
        to the CPU cache (or kept as staging buffers with ``local_cpu: false``).
        """
        acquired = self.pin_cpu_prefix([c.key for c in chunks])
        try:
            if len(acquired) < len(chunks):
                acquired += self.load_lower(chunks[len(acquired) :])
        except BaseException:
            self.release_all(acquired)
            raise
        self._update_gauges()
        return acquired

    def load_lower(self, chunks: Sequence[ChunkRange]) -> list[ChunkBuffer]:
        """Load a prefix of ``chunks`` from the lower tiers into pinned slots, one batch per
        tier; each chunk must hold exactly its own token count (a value that holds fewer
        would leave the rest of the slot as someone else's KV)."""
        loaded: list[ChunkBuffer] = []
        try:
            for tier in self.lower:
                pending = chunks[len(loaded) :]
                if not pending:
                    break
                available = self._contains(tier, [c.key for c in pending])
                if available == 0:
                    continue
                got = self._load_from(tier, pending[:available], loaded)
                if got < available:
                    break
        except BaseException:
            self.release_all(loaded)
            raise
        return loaded

    def _load_from(
        self, tier: StorageBackend, chunks: Sequence[ChunkRange], loaded: list[ChunkBuffer]
    ) -> int:
        """Load ``chunks`` from one tier, appending their pinned buffers to ``loaded``."""
        buffers: list[ChunkBuffer] = []
        try:
            for chunk in chunks:
                buffer = self._allocate(chunk.num_tokens)
                if buffer is None:
                    break
                buffers.append(buffer)
            keys = [c.key for c in chunks[: len(buffers)]]
            got = tier.load_prefix(keys, buffers) if buffers else 0
        except Exception:
            logger.exception("%s tier: load failed; treated as a miss", tier.name)
            self.metrics.tier_error(tier.name, "read")
            got = 0
        except BaseException:
            for buffer in buffers:
                self.release(buffer)
            raise
        for buffer in buffers[got:]:
            self.release(buffer)
        self.metrics.tier_hits(tier.name, got)
        for chunk, buffer in zip(chunks[:got], buffers[:got], strict=True):
            loaded.append(self._promote(chunk.key, buffer))
        return got

    def _promote(self, key: str, buffer: ChunkBuffer) -> ChunkBuffer:
        """Put a loaded buffer in the CPU cache; returns the pinned buffer to read from."""
        if not self.config.local_cpu:
            return buffer
        with self._lock:
            existing = self.cpu.get(key)
            if existing is None:
                buffer.refs += 1  # the index's reference; the caller keeps its pin
                self.cpu.insert(key, buffer)
                if self.listener is not None:  # under the lock that changed the index
                    self.listener.landed(key, "cpu")
            else:
                self._hold(existing)
        if existing is None:
            return buffer
        self.release(buffer)
        return existing

    def pin_cpu_prefix(self, keys: Sequence[str]) -> list[ChunkBuffer]:
        """Pin the CPU-resident prefix of ``keys`` without touching lower tiers."""
        pinned: list[ChunkBuffer] = []
        with self._lock:
            for key in keys:
                buffer = self.cpu.get(key)
                if buffer is None:
                    break
                self._hold(buffer)
                pinned.append(buffer)
        return pinned

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for background write-through to every lower tier."""
        return all(tier.flush(timeout) for tier in self.lower)

    def close(self) -> None:
        for tier in self.lower:
            tier.close()
        self.pool.close()
