"""The Valkey/Redis tier: KV shared by every pod of a deployment, off the request path.

Reads (lookups and loads) run on the caller's thread under a short deadline; writes are queued
from the pool slot and pipelined by one background thread, the queue bounded in bytes. A circuit
breaker skips the tier while the server is failing, so a dead or slow server costs a request at
most one deadline; the writer thread probes it back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lmcache.config import GB, LMCacheEngineConfig
from lmcache.memory.pool import ChunkBuffer
from lmcache.metrics import EngineMetrics
from lmcache.spec import KVSpec
from lmcache.storage import serde
from lmcache.storage.backend import StorageBackend, WriteDone
from lmcache.storage.remote.breaker import CircuitBreaker
from lmcache.storage.remote.client import RemoteClient, RemoteError, ReplyReader, WriteItem

logger = logging.getLogger("lmcache")

TIER = "remote"
_BATCH_BYTES = 256 << 20
"""Most bytes pipelined in one write round trip (bounds one batch's time under the deadline)."""
LOAD_FLOOR_BYTES_PER_S = 200e6
"""A load may take one timeout plus its chunks' bytes at this rate (0.17 s per 32 MiB chunk):
a server slower than that counts as failing. Lookups, which come first, get only the timeout."""


@dataclass(frozen=True)
class RemoteSettings:
    """The remote tier's knobs, in the units the code uses."""

    timeout_s: float
    write_timeout_s: float
    ttl_s: int | None
    queue_bytes: int
    breaker_failures: int
    breaker_backoff_s: float
    slot_bytes: int

    def load_budget_s(self, chunks: int) -> float:
        """Deadline of a load: first byte within the timeout, then a floor on throughput."""
        return self.timeout_s + chunks * self.slot_bytes / LOAD_FLOOR_BYTES_PER_S

    @classmethod
    def from_config(cls, config: LMCacheEngineConfig, spec: KVSpec) -> RemoteSettings:
        return cls(
            timeout_s=config.remote_timeout_ms / 1000,
            write_timeout_s=config.remote_write_timeout_ms / 1000,
            ttl_s=config.remote_ttl_s,
            queue_bytes=int(config.remote_write_queue_size * GB),
            breaker_failures=config.remote_breaker_failures,
            breaker_backoff_s=config.remote_breaker_backoff_s,
            slot_bytes=config.chunk_size * spec.bytes_per_token,
        )


@dataclass
class _Pending:
    key: str
    buffer: ChunkBuffer
    nbytes: int
    done: WriteDone


class RemoteBackend(StorageBackend):
    """A ``StorageBackend`` over one Valkey/Redis server; see the module docstring."""

    name = TIER

    def __init__(
        self, client: RemoteClient, settings: RemoteSettings, spec: KVSpec, metrics: EngineMetrics
    ) -> None:
        self._client = client
        self._settings = settings
        self._spec = spec
        self._metrics = metrics
        self._breaker = CircuitBreaker(
            settings.breaker_failures, settings.breaker_backoff_s, self._breaker_changed
        )
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._queued_bytes = 0
        """Bytes queued or being written: what the write path pins in the pool."""
        self._closed = False
        self._warned: set[str] = set()
        """Write errors already logged (an -OOM server would otherwise log every batch)."""
        metrics.breaker_open(False)
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="lmcache-remote-encode")
        self._writer = threading.Thread(
            target=self._write_loop, name="lmcache-remote-writer", daemon=True
        )
        self._writer.start()

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    # -- reads (caller's thread, under the deadline) ------------------------------------------

    def contains_prefix(self, keys: Sequence[str]) -> int:
        if not keys or not self._breaker.allow():
            return 0
        start = time.monotonic()
        try:
            found = self._client.exists(keys, self._settings.timeout_s)
        except Exception as err:
            self._failed("lookup", err)
            return 0
        self._succeeded("lookup", 0, start)
        return next((i for i, hit in enumerate(found) if not hit), len(found))

    def load_prefix(self, keys: Sequence[str], buffers: Sequence[ChunkBuffer]) -> int:
        keys = keys[: len(buffers)]
        if not keys or not self._breaker.allow():
            return 0
        start = time.monotonic()
        filled: list[int] = []
        refused: list[tuple[str, serde.CorruptValue]] = []

        def consume(i: int, length: int, reader: ReplyReader) -> bool:
            if length < 0:
                return False
            try:
                self._read_value(reader, keys[i], buffers[i], length)
            except serde.CorruptValue as err:
                refused.append((keys[i], err))
                raise
            filled.append(buffers[i].nbytes)
            return True

        try:
            self._client.get_each(keys, self._settings.load_budget_s(len(keys)), consume)
        except serde.CorruptValue:
            pass
        except Exception as err:
            self._failed("get", err)
            return len(filled)
        self._succeeded("get", sum(filled), start, count=len(filled))
        for key, problem in refused:
            self._refuse(key, problem)
        return len(filled)

    def _read_value(self, reader: ReplyReader, key: str, buffer: ChunkBuffer, length: int) -> None:
        """Validate the header against ``key``, the spec and the chunk's token count, stream the
        payload into the slot, verify its checksum."""
        if length < serde.FIXED_SIZE:
            raise serde.CorruptValue(f"value of {length} bytes is shorter than a header")
        header, header_size = serde.read_header(reader.read, length)
        header.check(key, self._spec, buffer.num_tokens)
        if header_size + header.payload_len != length:
            raise serde.CorruptValue(
                f"value is {length} bytes, header says {header_size + header.payload_len}"
            )
        payload = buffer.pool.slot_bytes(buffer.slot).numpy().data[: header.payload_len]
        reader.read_into(payload)
        reader.expect_crlf()
        serde.verify_payload(header, payload)

    def _refuse(self, key: str, err: serde.CorruptValue) -> None:
        """A value failed validation: count it, say so, and delete it so it is rewritten."""
        m = self._metrics
        m.corrupt(TIER)
        logger.warning(
            "remote value for key %s refused (%s); treated as a miss and deleted", key, err
        )
        try:
            self._client.delete(key, self._settings.timeout_s)
        except Exception as del_err:
            self._failed("delete", del_err)

    # -- writes (background thread) -----------------------------------------------------------

    def submit(self, key: str, buffer: ChunkBuffer, done: WriteDone) -> None:
        nbytes = buffer.nbytes
        with self._cond:
            accept = (
                not self._closed
                and not self._breaker.is_open
                and self._queued_bytes + nbytes <= self._settings.queue_bytes
            )
            if accept:
                self._queue.append(_Pending(key, buffer, nbytes, done))
                self._queued_bytes += nbytes
                self._cond.notify_all()
        if not accept:
            self._metrics.dropped_writes(TIER)
            done()

    def flush(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._queued_bytes == 0, timeout)

    def close(self) -> None:
        """Send what is queued in one last batch (the batch in flight plus that one: at most
        two write deadlines), then disconnect."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._writer.join(2 * self._settings.write_timeout_s + 1)
        if self._writer.is_alive():
            logger.warning("remote writer still busy at close; its buffers are released late")
        self._encoder.shutdown(wait=False)
        self._client.close()

    def _write_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                if batch:
                    self._write(batch)
                else:
                    self._probe()
            except Exception:  # a dead writer would pin its queue's slots forever
                logger.exception("remote writer: unexpected error; continuing")

    def _next_batch(self) -> list[_Pending] | None:
        """Queued writes up to a batch; [] when the open breaker is due a probe; None to stop."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                if self._breaker.is_open:
                    if not self._cond.wait(self._settings.breaker_backoff_s) and not self._queue:
                        return []
                else:
                    self._cond.wait()
            if self._closed:
                batch = list(self._queue)
                self._queue.clear()
                return batch
            batch = [self._queue.popleft()]
            size = batch[0].nbytes
            while self._queue and size + self._queue[0].nbytes <= _BATCH_BYTES:
                size += self._queue[0].nbytes
                batch.append(self._queue.popleft())
            return batch

    def _probe(self) -> None:
        if not self._breaker.allow():
            return
        try:
            self._client.ping(self._settings.timeout_s)
        except Exception as err:
            self._failed("probe", err)
            return
        self._breaker.success()

    def _write(self, batch: list[_Pending]) -> None:
        try:
            if not self._breaker.allow():
                self._metrics.dropped_writes(TIER, len(batch))
                return
            start = time.monotonic()
            # Headers (checksums) are computed on the encoder thread while earlier values are
            # on the wire; in line they left a 1-4 ms gap before every 32 MiB value (~10%).
            encoded = [self._encoder.submit(self._item, p) for p in batch]
            try:
                errors = self._client.set_many(
                    (f.result() for f in encoded),
                    self._settings.ttl_s,
                    self._settings.write_timeout_s,
                )
            except Exception as err:
                self._failed("put", err)
                self._metrics.dropped_writes(TIER, len(batch))
                return
            finally:
                futures.wait(encoded)  # no checksum may still read a slot once it is released
            written = [p.nbytes for p, e in zip(batch, errors, strict=True) if e is None]
            self._succeeded("put", sum(written), start, count=len(written))
            refused = [e for e in errors if e is not None]
            if refused:
                for _ in refused:
                    self._metrics.tier_error(TIER, "put")
                self._metrics.dropped_writes(TIER, len(refused))
            for error in set(refused) - self._warned:
                self._warned.add(error)
                logger.warning(
                    "remote tier %s refused a write: %s (warned once per message; see "
                    "docs/remote.md for the server settings)",
                    self._client.target,
                    error,
                )
        finally:
            for pending in batch:
                self._finish(pending)

    def _item(self, pending: _Pending) -> WriteItem:
        payload = pending.buffer.raw().numpy().data
        header = serde.header_for(pending.key, self._spec, pending.buffer.num_tokens, payload)
        return WriteItem(pending.key, header.encode(), payload)

    def _finish(self, pending: _Pending) -> None:
        """Release the slot to its owner, then the queue space."""
        try:
            pending.done()
        except Exception:
            logger.exception("remote write completion callback failed for %s", pending.key)
        with self._cond:
            self._queued_bytes -= pending.nbytes
            self._cond.notify_all()

    # -- bookkeeping ----------------------------------------------------------------------------

    def _succeeded(self, op: str, nbytes: int, start: float, count: int = 1) -> None:
        self._breaker.success()
        self._metrics.remote_io(op, nbytes, time.monotonic() - start, count)

    def _failed(self, op: str, err: Exception) -> None:
        """Every failed call ends here, whatever it raised: the breaker's probe, if this call
        was it, is always settled (else the tier would stay off until a restart)."""
        self._metrics.tier_error(TIER, op)
        if isinstance(err, RemoteError):
            logger.debug("remote %s failed: %s", op, err)
        else:
            logger.warning("remote %s failed unexpectedly: %r", op, err)
        self._breaker.failure(f"{op}: {err}")

    def _breaker_changed(self, is_open: bool, reason: str) -> None:
        self._metrics.breaker_open(is_open)
        if is_open:
            logger.warning(
                "remote tier %s unavailable (%s); skipping it, probing every %gs",
                self._client.target,
                reason,
                self._settings.breaker_backoff_s,
            )
        else:
            logger.info("remote tier %s is back (%s)", self._client.target, reason)
        with self._cond:
            self._cond.notify_all()
