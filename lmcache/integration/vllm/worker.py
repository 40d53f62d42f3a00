"""Worker side: owns this rank's engine and moves KV between it and vLLM's paged cache.

The scheduler decides; a rank moves bytes and answers for what it holds. Each step:

- ``handle_preemptions`` (before vLLM zeroes and reuses freed blocks): the compute stream is
  fenced behind stores still reading a preempted request's blocks.
- ``start_load``: stores that have landed are published, loads that have finished unpin
  their chunks; then the step's loads are issued from the chunks the rank pinned at lookup
  (on a side stream; the compute stream waits on the GPU, per layer with ``use_layerwise``).
  A load whose chunks are not pinned here has its blocks reported to vLLM.
- ``wait_for_save``: slots are reserved for the new chunks of every request and the
  gathers and device-to-host copies are queued on side streams; nothing waits. A request
  whose load failed in this step stores nothing: its new KV was computed over missing context.
- ``get_finished``: a finished request is reported once its stores have landed, so vLLM
  keeps its blocks until the copies out of them are done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmcache.engine import LMCacheEngine
from lmcache.integration.vllm import settings
from lmcache.integration.vllm.events import TierEvents
from lmcache.integration.vllm.metadata import LMCacheConnectorMetadata, LoadSpec, StoreSpec
from lmcache.integration.vllm.paged import (
    ChunkJob,
    Issued,
    PagedKVCache,
    PagedTransfer,
    store_jobs,
)
from lmcache.integration.vllm.pins import PinTable
from lmcache.integration.vllm.rpc import Answer, RankServer
from lmcache.integration.vllm.stats import TransferStats
from lmcache.keys import ChunkRange
from lmcache.log import log_store
from lmcache.memory.pool import ChunkBuffer
from lmcache.storage.manager import Reserved

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent

logger = logging.getLogger("lmcache")


@dataclass
class _Store:
    """Stores of one request issued in one step, published once ``done`` has landed."""

    req_id: str
    reserved: Reserved
    done: Issued | None
    cpu_seconds: float
    """The copies' time where they ran synchronously (``done`` is None: CPU tensors)."""


@dataclass
class _Load:
    """A step's loads: their source chunks stay pinned until ``done`` has landed."""

    buffers: list[ChunkBuffer]
    done: Issued | None
    cpu_seconds: float
    requested: int
    """Tokens the step's load specs asked for (failed ones included)."""
    tokens: int
    """Tokens copied."""


def _landed(done: Issued | None) -> bool:
    return done is None or done.landed()


def _seconds(done: Issued | None, cpu_seconds: float) -> float:
    """How long a landed transfer took: on the GPU, not until the step that noticed it."""
    return cpu_seconds if done is None else done.seconds()


class WorkerConnector:
    def __init__(self, vllm_config: VllmConfig) -> None:
        self.vllm_config = vllm_config
        self.config = settings.engine_config(vllm_config)
        self.instance_id = settings.instance_id(vllm_config)
        self.block_size = vllm_config.cache_config.block_size
        self.layerwise = settings.use_layerwise(vllm_config)
        self._kv_events = settings.kv_events(vllm_config)
        self.events: TierEvents | None = None
        self.rank, self.world_size = 0, 1
        self._engine: LMCacheEngine | None = None
        self._pins: PinTable | None = None
        self.transfer: PagedTransfer | None = None
        self._server: RankServer | None = None
        self._layers: dict[str, int] = {}
        self._lock = threading.Lock()  # the rank server thread publishes landed stores too
        self._stores: deque[_Store] = deque()
        self._loads: list[_Load] = []
        self._storing: dict[str, int] = {}
        """Requests that had stores shipped to them -> their stores not landed yet."""
        self._stored_keys: dict[str, list[str]] = {}
        """Keys of each live request's chunks, in prompt order: touched when it finishes."""
        self._finishing: set[str] = set()
        self._failed: set[str] = set()
        self._load_errors: set[int] = set()
        self._stats = TransferStats()

    @property
    def engine(self) -> LMCacheEngine:
        if self._engine is None:
            raise RuntimeError("register_kv_caches has not been called")
        return self._engine

    @property
    def pins(self) -> PinTable:
        if self._pins is None:
            raise RuntimeError("register_kv_caches has not been called")
        return self._pins

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Build this rank's engine for the KV geometry vLLM allocated (and, by now, with
        vLLM's parallel groups set up, for this rank's shard), its device staging, and the
        socket the scheduler asks it on."""
        cache = PagedKVCache(list(kv_caches.values()))
        if self._engine is not None and cache.spec != self._engine.spec:
            raise ValueError(
                f"re-registered KV caches have geometry {cache.spec}, the engine was built "
                f"for {self._engine.spec}; allowed: the same geometry"
            )
        self._layers = {name: i for i, name in enumerate(kv_caches)}
        self.transfer = PagedTransfer(cache)
        if self._engine is not None:  # re-registered (e.g. after vLLM's sleep mode): keep KV
            return
        self.rank, self.world_size = settings.shard(self.vllm_config)
        # One rank speaks for the instance: vLLM passes on an event only when every rank that
        # reports in a step sent it, so ranks whose chunks land in different steps would have
        # events sent twice or dropped. Ranks store the same chunks; rank 0's tiers stand for all.
        if self._kv_events and self.rank == 0:
            self.events = TierEvents()
        self._engine = LMCacheEngine(
            self.config,
            cache.spec,
            settings.model_identity(self.vllm_config),
            self.world_size,
            self.rank,
            kv_dtype=settings.kv_dtype(self.vllm_config, cache.spec),
            listener=self.events,
        )
        self._pins = PinTable(self._engine)
        self._server = RankServer(self, self.instance_id, self.rank)
        logger.info(
            "LMCache connector: rank %d/%d, %d layers %s %s, block size %d, chunk size %d",
            self.rank,
            self.world_size,
            len(cache.layers),
            cache.layout.name,
            cache.spec.dtype_name,
            self.block_size,
            self.config.chunk_size,
        )

    # -- the scheduler's questions (rank server thread) ------------------------------------

    def lookup(self, req_id: str, digests: Sequence[ChunkRange]) -> Answer:
        self.poll()  # an idle engine publishes its last stores when asked
        return self.pins.lookup(req_id, digests)

    def status(self, req_id: str) -> Answer:
        return self.pins.status(req_id)

    def release(self, req_id: str) -> None:
        self.pins.release(req_id)

    # -- load --------------------------------------------------------------------------

    def start_load(self, meta: LMCacheConnectorMetadata) -> None:
        self.poll()
        jobs: list[ChunkJob] = []
        buffers: list[ChunkBuffer] = []
        for load in meta.loads:
            planned = self._plan_load(load, jobs)
            if planned is None:
                self._fail(load, "its chunks are not pinned on this rank")
            else:
                buffers += planned
        requested = sum(ld.end - ld.start for ld in meta.loads)
        if not jobs:
            if requested:
                self.engine.metrics.retrieve(requested, 0, 0)
            return
        started = time.perf_counter()
        try:
            done = self._transfer().start_load(jobs, self.layerwise)
        except Exception:
            logger.exception("LMCache KV copy into the paged cache failed")
            self._drain()  # copies already queued may still read the pinned chunks
            self.engine.storage.release_all(buffers)
            for load in meta.loads:
                self._fail(load, "the copy into the paged cache failed")
            self.engine.metrics.retrieve(requested, 0, 0)
            return
        copied = sum(job.hi - job.lo for job in jobs)
        cpu_seconds = time.perf_counter() - started
        self._loads.append(_Load(buffers, done, cpu_seconds, requested, copied))

    def _plan_load(self, load: LoadSpec, jobs: list[ChunkJob]) -> list[ChunkBuffer] | None:
        """Take the request's pinned chunks and queue their copies."""
        keys = [self.engine.scheme.key(c.key) for c in load.chunks]
        buffers = self.pins.take(load.req_id, keys)
        if buffers is None:
            return None
        slots = load.blocks.slots(self.block_size, load.start, load.end)  # once per load
        for chunk, buffer in zip(load.chunks, buffers, strict=True):
            lo, hi = max(chunk.start, load.start), min(chunk.end, load.end)
            if lo >= hi:  # pinned before vLLM's own prefix cache grew over it
                continue
            job_slots = slots[lo - load.start : hi - load.start]
            jobs.append(ChunkJob(buffer.kv(), lo - chunk.start, hi - chunk.start, job_slots))
        return buffers

    def _fail(self, load: LoadSpec, why: str) -> None:
        """Report a load's blocks to vLLM (which recomputes them, or fails the request under
        ``kv_load_failure_policy: fail``) and keep the request from storing in this step."""
        self._failed.add(load.req_id)
        self._load_errors |= load.blocks.blocks_from(self.block_size, load.start, load.end)
        logger.warning(
            "LMCache could not load tokens [%d, %d) of request %s on rank %d: %s",
            load.start,
            load.end,
            load.req_id,
            self.rank,
            why,
        )

    def handle_preemptions(self, meta: LMCacheConnectorMetadata) -> None:
        """vLLM frees a preempted request's blocks at once and, before this step's forward,
        zeroes and reuses them: the compute stream first waits (on the GPU) for the stores
        still reading them. vLLM's model runner calls this before it touches the blocks."""
        if not meta.preempted:
            return
        wanted = set(meta.preempted)
        with self._lock:
            stores = [s.done for s in self._stores if s.req_id in wanted]
        for store in stores:
            self._transfer().fence(store)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self.layerwise and self.transfer is not None:
            layer = self._layers.get(layer_name)
            if layer is not None:
                self.transfer.wait_layer(layer)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # -- store -------------------------------------------------------------------------

    def wait_for_save(self, meta: LMCacheConnectorMetadata) -> None:
        """Queue this step's stores: slots for every request's new chunks, one batch of
        copies, no wait. Chunks are published when their copies have landed (:meth:`poll`)."""
        failed, self._failed = self._failed, set()
        planned: list[tuple[StoreSpec, Reserved]] = []
        jobs: list[ChunkJob] = []
        for spec in meta.stores:
            self._storing.setdefault(spec.req_id, 0)
            chunks = self.engine.scheme.keys(spec.chunks)
            self._stored_keys.setdefault(spec.req_id, []).extend(c.key for c in chunks)
            if spec.req_id in failed:
                logger.warning(
                    "LMCache: request %s stores nothing this step (its load failed)", spec.req_id
                )
                continue
            try:
                reserved = self._plan_store(spec, chunks, jobs)
            except Exception:
                logger.exception("LMCache store of request %s failed; not cached", spec.req_id)
                continue
            planned.append((spec, reserved))
        if not planned:
            return
        started = time.perf_counter()
        try:
            done = self._transfer().store(jobs)
        except Exception:
            logger.exception("LMCache KV copy out of the paged cache failed; not cached")
            self._drain()  # copies already queued may still write the reserved slots
            for _, reserved in planned:
                self.engine.abort_chunks(reserved)
                if self.events is not None:
                    for chunk, _ in reserved:
                        self.events.forget(chunk.key)
            return
        cpu_seconds = time.perf_counter() - started
        with self._lock:
            for spec, reserved in planned:
                self._stores.append(_Store(spec.req_id, reserved, done, cpu_seconds))
                self._storing[spec.req_id] += 1
        for spec, reserved in planned:
            if self.rank == 0:
                log_store(spec.req_id, sum(c.num_tokens for c, _ in reserved), spec.total_tokens)
        self.poll()

    def _plan_store(
        self, spec: StoreSpec, chunks: list[ChunkRange], jobs: list[ChunkJob]
    ) -> Reserved:
        """Reserve slots for the request's chunks (``spec``'s, keyed) this rank does not hold
        and queue their copies (a chunk another request of the step reserved is left to it)."""
        reserved = self.engine.storage.reserve(chunks)
        try:
            if reserved:
                start = reserved[0][0].start
                slots = spec.blocks.slots(self.block_size, start, reserved[-1][0].end)
                jobs += store_jobs(reserved, slots, first_token=start)
        except Exception:
            self.engine.abort_chunks(reserved)  # else the slots and pending keys stay taken
            raise
        if self.events is not None:
            described = dict(zip((c.key for c in chunks), spec.events, strict=False))
            for chunk, _ in reserved:
                event = described.get(chunk.key)
                if event is not None:
                    self.events.describe(chunk.key, event)
        return reserved

    def _drain(self) -> None:
        """Wait (on the CPU) for every copy queued on the device: before a failed transfer's
        slots or pins are given back, since copies queued before the failure still use them.
        Only on these error paths."""
        if self.transfer is not None and self.transfer.cache.device.type == "cuda":
            torch.cuda.synchronize(self.transfer.cache.device)

    def poll(self) -> None:
        """Publish stores whose bytes have landed (in issue order) and unpin the sources of
        finished loads; never waits."""
        with self._lock:
            landed: list[_Store] = []
            while self._stores and _landed(self._stores[0].done):
                landed.append(self._stores.popleft())
            landed_now = [(ld, _landed(ld.done)) for ld in self._loads]  # one query each
            loads = [ld for ld, done in landed_now if done]
            self._loads = [ld for ld, done in landed_now if not done]
        for store in landed:
            seconds = _seconds(store.done, store.cpu_seconds)
            try:
                stored = self.engine.storage.commit(store.reserved, seconds)
            except Exception:
                logger.exception("LMCache: publishing stores of %s failed", store.req_id)
                stored = 0
            with self._lock:  # poll also runs on the rank server's thread
                self._stats.record_store(stored, sum(b.nbytes for _, b in store.reserved))
                self._storing[store.req_id] -= 1
        for load in loads:
            nbytes = sum(b.nbytes for b in load.buffers)
            seconds = _seconds(load.done, load.cpu_seconds)
            self.engine.metrics.retrieve(load.requested, load.tokens, nbytes, seconds)
            with self._lock:
                self._stats.record_load(load.tokens, nbytes, seconds)
            self.engine.storage.release_all(load.buffers)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, None]:
        """Requests vLLM may now free: finished ones with stores, once those have landed
        (the scheduler kept their blocks for exactly these)."""
        self.poll()
        with self._lock:
            self._finishing |= finished_req_ids & self._storing.keys()
            done = {r for r in self._finishing if self._storing[r] == 0}
            self._finishing -= done
            for req_id in done:
                del self._storing[req_id]
        for req_id in done:
            self.engine.storage.touch(self._stored_keys.pop(req_id, []))
        return done or None, None

    def take_stats(self) -> TransferStats | None:
        """Transfer statistics since the last call (None when nothing moved)."""
        with self._lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, TransferStats()
        return stats

    def take_events(self) -> list[KVCacheEvent]:
        """KV events since the last step (none unless ``--kv-events-config`` is on)."""
        return self.events.take() if self.events is not None else []

    def _transfer(self) -> PagedTransfer:
        if self.transfer is None:
            raise RuntimeError("register_kv_caches has not been called")
        return self.transfer

    def close(self) -> None:
        """Stop answering, let queued copies land, then free the engine."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._engine is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.poll()
        if self._pins is not None:
            self._pins.close()
        self._engine.close()
        self._engine = None


__all__ = ["WorkerConnector"]
