"""The local disk tier: one file per chunk, LRU-bounded, written in the background.

Files are written to a temp name and renamed, so a crash never leaves a half file under a real
name; every read checks the header and checksum, and a bad file is deleted and counted as a
miss. The index is rebuilt from the files' headers at start, so the cache survives restarts.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import xxhash

from lmcache.memory.pool import ChunkBuffer
from lmcache.metrics import EngineMetrics
from lmcache.spec import KVSpec
from lmcache.storage import serde
from lmcache.storage.backend import StorageBackend, WriteDone

logger = logging.getLogger("lmcache")
SUFFIX = ".kv"
TIER = "disk"


class DiskBackend(StorageBackend):
    name = TIER

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        spec: KVSpec,
        chunk_size: int,
        metrics: EngineMetrics,
        queue_chunks: int = 64,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.spec = spec
        self.chunk_size = chunk_size
        self.metrics = metrics
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> file size, LRU first
        self._bytes = 0
        self._queue: queue.Queue[tuple[str, ChunkBuffer, WriteDone] | None] = queue.Queue(
            queue_chunks
        )
        directory.mkdir(parents=True, exist_ok=True)
        self._rebuild_index()
        self._writer = threading.Thread(target=self._write_loop, name="lmcache-disk", daemon=True)
        self._writer.start()

    def path_of(self, key: str) -> Path:
        return self.directory / (xxhash.xxh3_128_hexdigest(key.encode()) + SUFFIX)

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def _rebuild_index(self) -> None:
        """Re-index surviving files, oldest first; drop temp files and unreadable headers."""
        files = []
        for path in self.directory.iterdir():
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
            elif path.suffix == SUFFIX:
                files.append((path.stat().st_mtime, path))
        for _, path in sorted(files):
            try:
                with path.open("rb") as f:
                    header = serde.decode_header(f.read(serde.MAX_HEADER))
                size = path.stat().st_size
                if path != self.path_of(header.key) or size != header.size + header.payload_len:
                    raise serde.CorruptValue("file name or size does not match its header")
            except (OSError, serde.CorruptValue) as err:
                logger.warning("disk tier: removing unreadable %s (%s)", path.name, err)
                self.metrics.labels(self.metrics.corrupt, TIER).inc()
                path.unlink(missing_ok=True)
                continue
            self._index[header.key] = size
            self._bytes += size
        self._evict_over_budget()
        self.metrics.labels(self.metrics.disk_bytes).set(self._bytes)

    def contains_prefix(self, keys: Sequence[str]) -> int:
        with self._lock:
            for i, key in enumerate(keys):
                if key not in self._index:
                    return i
            return len(keys)

    def load_prefix(self, keys: Sequence[str], buffers: Sequence[ChunkBuffer]) -> int:
        for i, (key, buffer) in enumerate(zip(keys, buffers, strict=False)):
            if not self._load(key, buffer):
                return i
        return min(len(keys), len(buffers))

    def _load(self, key: str, buffer: ChunkBuffer) -> bool:
        with self._lock:
            if key not in self._index:
                return False
            self._index.move_to_end(key)
        path = self.path_of(key)
        started = time.perf_counter()
        try:
            with path.open("rb") as f:
                prefix = f.read(serde.FIXED_SIZE)
                rest = f.read(serde.variable_size(prefix) - serde.FIXED_SIZE)
                header = serde.decode_header(prefix + rest)
                buffer.num_tokens = header.num_tokens_for(key, self.spec, self.chunk_size)
                target = buffer.raw().numpy().data
                if f.readinto(target) != header.payload_len or f.read(1):
                    raise serde.CorruptValue("file length does not match its header")
            serde.verify_payload(header, target)
        except FileNotFoundError:
            self._forget(key)
            return False
        except serde.CorruptValue as err:
            logger.warning("disk tier: refusing %s (%s); removed", path.name, err)
            self.metrics.labels(self.metrics.corrupt, TIER).inc()
            self._forget(key, path)
            return False
        except OSError as err:
            logger.warning("disk tier: read of %s failed: %s", path.name, err)
            self.metrics.labels(self.metrics.tier_errors, TIER, "read").inc()
            return False
        self._observe("read", header.payload_len, started)
        return True

    def submit(self, key: str, buffer: ChunkBuffer, done: WriteDone) -> None:
        with self._lock:
            known = key in self._index
        if known:
            done()
            return
        try:
            self._queue.put_nowait((key, buffer, done))
        except queue.Full:
            self.metrics.labels(self.metrics.dropped_writes, TIER).inc()
            done()

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            key, buffer, done = item
            try:
                self._write(key, buffer)
            finally:
                done()
                self._queue.task_done()
        self._queue.task_done()

    def _write(self, key: str, buffer: ChunkBuffer) -> None:
        started = time.perf_counter()
        payload = buffer.raw().numpy().data
        header = serde.header_for(key, self.spec, buffer.num_tokens, payload).encode()
        size = len(header) + payload.nbytes
        if size > self.max_bytes:
            self.metrics.labels(self.metrics.dropped_writes, TIER).inc()
            return
        path = self.path_of(key)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with tmp.open("wb") as f:
                f.write(header)
                f.write(payload)
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            logger.warning("disk tier: write failed (%s); chunk not stored on disk", err)
            self.metrics.labels(self.metrics.tier_errors, TIER, "write").inc()
            return
        with self._lock:
            if key not in self._index:
                self._index[key] = size
                self._bytes += size
            self._evict_over_budget()
        self._observe("write", payload.nbytes, started)

    def _evict_over_budget(self) -> None:
        while self._bytes > self.max_bytes and self._index:
            key, size = self._index.popitem(last=False)
            self._bytes -= size
            self.path_of(key).unlink(missing_ok=True)
            self.metrics.labels(self.metrics.evictions, TIER).inc()
        self.metrics.labels(self.metrics.disk_bytes).set(self._bytes)

    def _forget(self, key: str, path: Path | None = None) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._bytes -= size
        if path is not None:
            path.unlink(missing_ok=True)

    def _observe(self, op: str, nbytes: int, started: float) -> None:
        m = self.metrics
        m.labels(m.tier_ops, TIER, op).inc()
        m.labels(m.tier_bytes, TIER, op).inc(nbytes)
        m.labels(m.tier_latency, TIER, op).observe(time.perf_counter() - started)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is on disk (or failed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join()
