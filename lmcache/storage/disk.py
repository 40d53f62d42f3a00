"""The local disk tier: one file per chunk, LRU-bounded, written in the background.

Files are written to a temp name and renamed, so a crash never leaves a half file under a real
name; every read checks the header and checksum, and a bad file is deleted and counted as a
miss. The index is rebuilt from the files' headers at start, so the cache survives restarts.

A broken disk (read-only, full, files replaced by directories or FIFOs, unreadable files) never
stops the engine: each failure is a miss, a metric and a log line, the writer thread survives
every error, and a file that cannot be read leaves the index so lookups stop promising it.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import stat
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
from lmcache.storage.backend import StorageBackend, TierListener, WriteDone

logger = logging.getLogger("lmcache")
SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"
TIER = "disk"


def _open_regular(path: Path) -> io.BufferedReader:
    """Open ``path`` for reading only if it is a regular file: a FIFO under a chunk's name
    would block ``open`` forever, a directory or device is no chunk."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise serde.CorruptValue("not a regular file")
        os.set_blocking(fd, True)
        return io.BufferedReader(io.FileIO(fd, "rb"))
    except BaseException:
        os.close(fd)
        raise


class DiskBackend(StorageBackend):
    name = TIER

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        spec: KVSpec,
        metrics: EngineMetrics,
        listener: TierListener | None = None,
        queue_chunks: int = 64,
    ) -> None:
        self.directory = directory
        self.listener = listener
        self.max_bytes = max_bytes
        self.spec = spec
        self.metrics = metrics
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> file size, LRU first
        self._bytes = 0
        self._queue: queue.Queue[tuple[str, ChunkBuffer, WriteDone] | None] = queue.Queue(
            queue_chunks
        )
        self._warned: set[str] = set()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._rebuild_index()
        except OSError as err:
            # A read-only or missing volume: the tier starts empty and every write is a
            # counted failure, like a disk that breaks later.
            self._warn_once("start", f"disk tier {directory} unusable at start-up ({err})")
            self.metrics.tier_error(TIER, "start")
        self._writer = threading.Thread(target=self._write_loop, name="lmcache-disk", daemon=True)
        self._writer.start()

    def path_of(self, key: str) -> Path:
        return self.directory / (xxhash.xxh3_128_hexdigest(key.encode()) + SUFFIX)

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def _rebuild_index(self) -> None:
        """Re-index surviving chunk files, oldest first; drop temp files and anything that is
        not a readable chunk file (never opening a FIFO or following a link)."""
        files = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.endswith(TMP_SUFFIX):
                    self._unlink(Path(entry.path))
                elif entry.name.endswith(SUFFIX):
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    files.append((info.st_mtime, Path(entry.path)))
        for _, path in sorted(files):
            try:
                with _open_regular(path) as f:
                    header, _ = serde.read_header(f.read)
                    size = os.fstat(f.fileno()).st_size
                if path != self.path_of(header.key) or size != header.size + header.payload_len:
                    raise serde.CorruptValue("file name or size does not match its header")
            except (OSError, serde.CorruptValue) as err:
                logger.warning("disk tier: removing unreadable %s (%s)", path.name, err)
                self.metrics.corrupt(TIER)
                self._unlink(path)
                continue
            self._index[header.key] = size
            self._bytes += size
            if self.listener is not None:
                self.listener.landed(header.key, TIER, header.tag)
        with self._lock:
            self._evict_over_budget()

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
            with _open_regular(path) as f:
                header, _ = serde.read_header(f.read)
                header.check(key, self.spec, buffer.num_tokens)
                target = buffer.raw().numpy().data
                if f.readinto(target) != header.payload_len or f.read(1):
                    raise serde.CorruptValue("file length does not match its header")
            serde.verify_payload(header, target)
        except FileNotFoundError:
            self._forget(key)
            return False
        except serde.CorruptValue as err:
            logger.warning("disk tier: refusing %s (%s); removed", path.name, err)
            self.metrics.corrupt(TIER)
            self._forget(key, path)
            return False
        except OSError as err:
            # Unreadable (permissions, I/O error): forget it, or every lookup would promise
            # a chunk no load can deliver.
            self._warn_once("read", f"disk tier: read of {path.name} failed: {err}; dropped")
            self.metrics.tier_error(TIER, "read")
            self._forget(key, path)
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
            self.metrics.dropped_writes(TIER)
            done()

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            key, buffer, done = item
            try:
                self._write(key, buffer)
            except Exception:  # a dead writer would stop the CPU cache from storing
                logger.exception("disk tier: unexpected error writing a chunk; continuing")
                self.metrics.tier_error(TIER, "write")
            finally:
                done()
                self._queue.task_done()
        self._queue.task_done()

    def _write(self, key: str, buffer: ChunkBuffer) -> None:
        started = time.perf_counter()
        payload = buffer.raw().numpy().data
        tag = self.listener.tag(key) if self.listener is not None else b""
        if len(tag) > serde.MAX_TAG:  # a header cannot hold it: the chunk goes without
            tag = b""
        header = serde.header_for(key, self.spec, buffer.num_tokens, payload, tag).encode()
        size = len(header) + payload.nbytes
        if size > self.max_bytes:
            self.metrics.dropped_writes(TIER)
            return
        path = self.path_of(key)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        try:
            with tmp.open("wb") as f:
                f.write(header)
                f.write(payload)
            os.replace(tmp, path)
        except OSError as err:
            self._unlink(tmp)
            self._warn_once("write", f"disk tier: write failed ({err}); chunks not stored on disk")
            self.metrics.tier_error(TIER, "write")
            return
        with self._lock:
            new = key not in self._index
            if new:
                self._index[key] = size
                self._bytes += size
            self._evict_over_budget()
        if new and self.listener is not None:
            self.listener.landed(key, TIER)
        self._observe("write", payload.nbytes, started)

    def _evict_over_budget(self) -> None:
        """Drop least recently used files until the tier fits its budget (lock held)."""
        while self._bytes > self.max_bytes and self._index:
            key, size = self._index.popitem(last=False)
            self._bytes -= size
            self._unlink(self.path_of(key))
            self.metrics.evicted(TIER)
            if self.listener is not None:
                self.listener.left(key, TIER)
        self.metrics.disk_usage(self._bytes)

    def _forget(self, key: str, path: Path | None = None) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._bytes -= size
            self.metrics.disk_usage(self._bytes)
        if size is not None and self.listener is not None:
            self.listener.left(key, TIER)
        if path is not None:
            self._unlink(path)

    def _unlink(self, path: Path) -> None:
        """Remove a file; on a read-only or broken disk that fails, which is only a metric."""
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError:
            self._warn_once("unlink", f"disk tier: {path.name} is a directory; left in place")
        except OSError as err:
            self._warn_once("unlink", f"disk tier: cannot remove {path.name}: {err}")
            self.metrics.tier_error(TIER, "delete")

    def _warn_once(self, kind: str, message: str) -> None:
        """One warning per kind of failure: a read-only disk fails every write."""
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning("%s (warned once)", message)

    def _observe(self, op: str, nbytes: int, started: float) -> None:
        self.metrics.disk_io(op, nbytes, time.perf_counter() - started)

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
