"""A worker rank's pins: the pool slots it promised the scheduler, per request.

A lookup pins the run of chunks this rank holds in its CPU pool and, when its disk or remote
tier holds the chunks that follow, stages them into fresh pinned slots in the background
(the scheduler asks again until staging is done). Whatever a rank answered is pinned until
the request's load takes it, or the request is released (finished, aborted, preempted): so a
promise made to vLLM can always be kept, whatever is evicted, corrupted or unreachable later.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from lmcache.engine import LMCacheEngine
from lmcache.integration.vllm.rpc import Answer
from lmcache.keys import ChunkRange
from lmcache.memory.pool import ChunkBuffer

logger = logging.getLogger("lmcache")


@dataclass(eq=False)
class _Pinned:
    """One request's pinned run: ``keys[i]`` is held in ``buffers[i]``."""

    keys: list[str] = field(default_factory=list)
    buffers: list[ChunkBuffer] = field(default_factory=list)
    staging: Future[None] | None = None


class PinTable:
    """Thread-safe: the rank server thread pins and releases, the step takes, and staging
    jobs complete on their own threads."""

    def __init__(self, engine: LMCacheEngine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._pinned: dict[str, _Pinned] = {}
        self._count = 0
        """Chunks pinned in all records (kept, not summed: the gauge follows every change)."""
        self._stager = ThreadPoolExecutor(2, thread_name_prefix="lmcache-stage")

    def lookup(self, req_id: str, digests: Sequence[ChunkRange]) -> Answer:
        """Pin this rank's CPU run of ``digests``, start staging what its lower tiers hold
        after it; replaces the request's earlier pins."""
        self.release(req_id)
        chunks = self._engine.scheme.keys(digests)
        storage = self._engine.storage
        buffers = storage.pin_cpu_prefix([c.key for c in chunks])
        record = _Pinned([c.key for c in chunks[: len(buffers)]], buffers)
        rest = chunks[len(buffers) :]
        found = storage.lookup([c.key for c in rest])[0] if rest and storage.lower else 0
        with self._lock:  # in the table before its staging job can look for it there
            self._pinned[req_id] = record
            self._count += len(buffers)
            if found:
                record.staging = self._stager.submit(self._stage, req_id, record, rest[:found])
        if chunks:
            self._engine.metrics.lookup(
                chunks[-1].end - chunks[0].start, sum(c.num_tokens for c in chunks[: len(buffers)])
            )
        self._gauge()
        return self._answer(record)

    def _stage(self, req_id: str, record: _Pinned, chunks: Sequence[ChunkRange]) -> None:
        """Load ``chunks`` from the lower tiers into pinned slots (as many as the pool can
        hold next to everything else pinned) and add them to the request's run."""
        try:
            loaded = self._engine.storage.load_lower(chunks)
        except Exception:
            logger.exception("LMCache staging for request %s failed; it is computed", req_id)
            loaded = []
        self._engine.metrics.lookup_hit(sum(c.num_tokens for c in chunks[: len(loaded)]))
        with self._lock:
            current = self._pinned.get(req_id) is record
            if current:
                record.keys += [c.key for c in chunks[: len(loaded)]]
                record.buffers += loaded
                self._count += len(loaded)
                record.staging = None
        if not current:  # released (or looked up again) meanwhile: the CPU cache keeps them
            self._engine.storage.release_all(loaded)
        self._gauge()

    def status(self, req_id: str) -> Answer:
        with self._lock:
            record = self._pinned.get(req_id)
            return self._answer(record) if record is not None else Answer(0, False)

    @staticmethod
    def _answer(record: _Pinned) -> Answer:
        return Answer(len(record.buffers), record.staging is not None)

    def take(self, req_id: str, keys: Sequence[str]) -> list[ChunkBuffer] | None:
        """The pinned buffers of ``keys`` for a load, which owns them from now on (and
        releases them once its copies are done); the request's other pins are released.
        None when this rank does not hold exactly that run (the load cannot be served)."""
        with self._lock:
            record = self._pop(req_id)
        if record is None:
            return None
        n = len(keys)
        taken = record.buffers[:n] if record.keys[:n] == list(keys) else None
        self._engine.storage.release_all(record.buffers[n:] if taken else record.buffers)
        self._gauge()
        return taken

    def release(self, req_id: str) -> None:
        """Unpin a request's chunks (a staging job still running releases its own)."""
        with self._lock:
            record = self._pop(req_id)
        if record is not None:
            self._engine.storage.release_all(record.buffers)
            self._gauge()

    def _pop(self, req_id: str) -> _Pinned | None:
        """Take a request's record out of the table (lock held)."""
        record = self._pinned.pop(req_id, None)
        if record is not None:
            self._count -= len(record.buffers)
        return record

    def _gauge(self) -> None:
        self._engine.metrics.pinned(len(self))

    def __len__(self) -> int:
        """Chunks pinned for requests (tests and gauges)."""
        with self._lock:
            return self._count

    def close(self) -> None:
        """Wait for staging jobs, then release every pin."""
        self._stager.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            requests = list(self._pinned)
        for req_id in requests:
            self.release(req_id)
