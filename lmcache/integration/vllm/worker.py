"""Worker side: owns this rank's engine and moves KV between it and vLLM's paged cache.

Loads are issued before the forward pass on a side stream (per-layer events with
``use_layerwise``, else the compute stream waits for all of them at once, which is safe under
full CUDA graphs). Stores run once per step after the forward pass: the new chunks of every
request get pool slots reserved, are gathered from the paged cache and copied into them in
one batch with a single wait, and only then are published. A chunk that cannot be loaded has its
blocks reported to vLLM, which recomputes them: a load never yields wrong KV silently.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from lmcache.engine import LMCacheEngine
from lmcache.integration.vllm import settings
from lmcache.integration.vllm.lookup import LookupServer
from lmcache.integration.vllm.metadata import LMCacheConnectorMetadata, RequestOp
from lmcache.integration.vllm.paged import ChunkJob, PagedKVCache, PagedTransfer, store_jobs
from lmcache.integration.vllm.shared import SharedEngine, chunks_to_load, publish, withdraw
from lmcache.memory.pool import ChunkBuffer
from lmcache.storage.manager import Reserved

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("lmcache")


class WorkerConnector:
    def __init__(self, vllm_config: VllmConfig) -> None:
        self.vllm_config = vllm_config
        self.config = settings.engine_config(vllm_config)
        self.instance_id = settings.instance_id(vllm_config)
        self.block_size = vllm_config.cache_config.block_size
        self.layerwise = settings.use_layerwise(vllm_config)
        self.rank, self.world_size = 0, 1
        self.shared: SharedEngine | None = None
        self.transfer: PagedTransfer | None = None
        self._server: LookupServer | None = None
        self._layers: dict[str, int] = {}
        self._inflight: list[ChunkBuffer] = []
        self._load_errors: set[int] = set()

    @property
    def engine(self) -> LMCacheEngine:
        if self.shared is None:
            raise RuntimeError("register_kv_caches has not been called")
        return self.shared.engine

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Build this rank's engine for the KV geometry vLLM allocated (and, by now, with
        vLLM's parallel groups set up, for this rank's shard)."""
        cache = PagedKVCache(list(kv_caches.values()))
        if self.shared is not None and cache.spec != self.shared.engine.spec:
            raise ValueError(
                f"re-registered KV caches have geometry {cache.spec}, the engine was built "
                f"for {self.shared.engine.spec}; allowed: the same geometry"
            )
        self._layers = {name: i for i, name in enumerate(kv_caches)}
        self.transfer = PagedTransfer(cache)
        if self.shared is not None:  # re-registered (e.g. after vLLM's sleep mode): keep KV
            return
        self.rank, self.world_size = settings.shard(self.vllm_config)
        engine = LMCacheEngine(
            self.config,
            cache.spec,
            settings.model_name(self.vllm_config),
            self.world_size,
            self.rank,
        )
        self.shared = publish(self.instance_id, self.rank, engine)
        if self.rank == 0 and not settings.scheduler_in_worker_process(self.vllm_config):
            self._server = LookupServer(engine, self.instance_id)
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

    # -- load --------------------------------------------------------------------------

    def start_load(self, meta: LMCacheConnectorMetadata) -> None:
        jobs: list[ChunkJob] = []
        loading = [op for op in meta.requests if op.load is not None]
        for op in loading:
            try:
                loaded = self._plan_load(op, jobs)
            except Exception:
                logger.exception("LMCache load of request %s failed; vLLM recomputes", op.req_id)
                loaded = 0
            self._report_missing(op, loaded)
        if not jobs:
            return
        try:
            self._transfer().start_load(jobs, self.layerwise)
        except Exception:
            logger.exception("LMCache KV copy into the paged cache failed; vLLM recomputes")
            for op in loading:
                self._report_missing(op, 0)

    def _plan_load(self, op: RequestOp, jobs: list[ChunkJob]) -> int:
        """Acquire the request's chunks and queue their copies; returns the end of the
        contiguous prefix that will be loaded."""
        load = op.load
        assert load is not None
        shared = self.shared
        assert shared is not None
        chunks = chunks_to_load(shared.engine, op.token_ids[: load.hit], load.start)
        buffers = shared.pins.take(op.req_id)
        buffers += shared.engine.storage.acquire(chunks[len(buffers) :])
        self._inflight.extend(buffers)
        slots = op.slots(self.block_size, load.end)
        loaded = load.start
        for chunk, buffer in zip(chunks, buffers, strict=False):
            lo, hi = max(chunk.start, load.start), min(chunk.end, load.end)
            if lo >= hi:
                break
            jobs.append(ChunkJob(buffer.kv(), lo - chunk.start, hi - chunk.start, slots[lo:hi]))
            loaded = hi
        metrics = shared.engine.metrics
        metrics.labels(metrics.retrieved_tokens).inc(loaded - load.start)
        metrics.labels(metrics.retrieved_bytes).inc(sum(b.nbytes for b in buffers))
        return loaded

    def _report_missing(self, op: RequestOp, loaded: int) -> None:
        load = op.load
        assert load is not None
        if loaded < load.end:
            start = max(loaded, load.start)
            self._load_errors |= op.blocks_from(self.block_size, start, load.end)
            logger.warning(
                "LMCache could load tokens [%d, %d) of request %s, not [%d, %d); "
                "vLLM recomputes the rest",
                load.start,
                start,
                op.req_id,
                load.start,
                load.end,
            )

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self.layerwise and self.transfer is not None:
            layer = self._layers.get(layer_name)
            if layer is not None:
                self.transfer.wait_layer(layer)

    def _finish_load(self) -> None:
        """Wait for the load copies, then unpin their source chunks."""
        if self.transfer is not None:
            self.transfer.finish_load()
        inflight, self._inflight = self._inflight, []
        for buffer in inflight:
            self.engine.storage.release(buffer)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # -- store -------------------------------------------------------------------------

    def wait_for_save(self, meta: LMCacheConnectorMetadata) -> None:
        """Finish this step's loads, then store the new chunks its forward pass computed:
        reserve slots for every request's new chunks, copy them all (one wait), publish."""
        self._finish_load()
        stores = [op for op in meta.requests if op.store_end is not None]
        if not stores:
            return
        engine = self.engine
        planned: list[tuple[RequestOp, Reserved]] = []
        jobs: list[ChunkJob] = []
        keys: set[str] = set()
        for op in stores:
            try:
                reserved = self._plan_store(op, jobs, keys)
            except Exception:
                logger.exception("LMCache store of request %s failed; not cached", op.req_id)
                continue
            planned.append((op, reserved))
        try:
            self._transfer().store(jobs)
        except Exception:
            logger.exception("LMCache KV copy out of the paged cache failed; not cached")
            for _, reserved in planned:
                engine.abort_chunks(reserved)
            return
        for op, reserved in planned:
            assert op.store_end is not None
            request_id = op.req_id if self.rank == 0 else None
            try:
                engine.commit_chunks(reserved, request_id, total_tokens=op.store_end)
            except Exception:
                logger.exception("LMCache store of request %s failed; not cached", op.req_id)

    def _plan_store(self, op: RequestOp, jobs: list[ChunkJob], keys: set[str]) -> Reserved:
        """Reserve slots for the request's new chunks and queue their copies. A chunk another
        request of this step already reserved (``keys``; same prompt prefix) is left to it."""
        assert op.store_end is not None
        slots = op.slots(self.block_size, op.store_end)
        tokens = op.token_ids[: op.store_end]
        reserved = self.engine.reserve_chunks(tokens, skip_tokens=op.store_skip)
        self.engine.abort_chunks([(c, b) for c, b in reserved if c.key in keys])
        reserved = [(c, b) for c, b in reserved if c.key not in keys]
        keys.update(c.key for c, _ in reserved)
        jobs += store_jobs(reserved, slots)
        return reserved

    def _transfer(self) -> PagedTransfer:
        if self.transfer is None:
            raise RuntimeError("register_kv_caches has not been called")
        return self.transfer

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self.shared is not None:
            self._finish_load()
            withdraw(self.instance_id, self.rank)
            self.shared.engine.close()
            self.shared = None
