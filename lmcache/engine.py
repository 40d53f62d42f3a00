"""The public engine: store, look up, retrieve and prefetch KV by token prefix."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch

from lmcache.config import LMCacheEngineConfig
from lmcache.keys import PLAIN, ChunkRange, KeyScheme, KVContext, Tokens
from lmcache.log import log_lookup, log_store, setup_logging
from lmcache.metrics import EngineMetrics
from lmcache.spec import KVSpec
from lmcache.storage.backend import StorageBackend, TierListener
from lmcache.storage.manager import Reserved, StorageManager

logger = logging.getLogger("lmcache")

ChunkFill = Callable[[ChunkRange, torch.Tensor], None]


class PrefetchHandle:
    """A background load of a prefix into the CPU cache; ``wait`` returns the tokens now hot."""

    def __init__(self, future: Future[int]) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> int:
        return self._future.result(timeout)


class LMCacheEngine:
    """KV cache for one model shard (one TP rank) in one process."""

    def __init__(
        self,
        config: LMCacheEngineConfig,
        spec: KVSpec,
        model_name: str,
        world_size: int = 1,
        rank: int = 0,
        lower_tiers: Sequence[StorageBackend] | None = None,
        kv_dtype: str | None = None,
        listener: TierListener | None = None,
    ) -> None:
        """``kv_dtype`` names the KV cache's element type when the tensor dtype does not
        (vLLM's fp8 e4m3 and e5m2 caches are both uint8 tensors); ``listener`` is told when
        chunks land in or leave a tier (KV events)."""
        setup_logging()
        self.config = config
        self.spec = spec
        self.scheme = KeyScheme(
            model_name, world_size, rank, kv_dtype or spec.dtype_name, config.chunk_size
        )
        # The label is the model's name alone: the identity's hashes would split dashboards.
        self.metrics = EngineMetrics(model_name.partition("@")[0], rank)
        self.storage = StorageManager(
            config, spec, self.metrics, self.scheme.shard_name, lower_tiers, listener
        )
        self._prefetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lmcache-prefetch")
        self._closed = False
        if config.metrics_port and rank == 0:
            # One scrape per instance: rank 0 serves every rank's metrics when they share a
            # PROMETHEUS_MULTIPROC_DIR (the operator sets one), else its own.
            self.metrics.serve(config.metrics_port)

    # -- keys ----------------------------------------------------------------------------

    def chunks(self, tokens: Tokens, context: KVContext = PLAIN) -> list[ChunkRange]:
        """The storable chunks of ``tokens`` (trailing partial one only with save_unfull_chunk)."""
        self._check_open()
        return self.scheme.chunks(tokens, self.config.save_unfull_chunk, context)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LMCacheEngine is closed; create a new one")

    # -- store ---------------------------------------------------------------------------

    def store(
        self,
        tokens: Tokens,
        kv: torch.Tensor,
        request_id: str | None = None,
        kv_offset: int = 0,
        context: KVContext = PLAIN,
    ) -> int:
        """Store KV for ``tokens``; ``kv`` covers ``tokens[kv_offset:]``. Returns tokens newly
        stored (chunks already cached, and chunks before ``kv_offset``, are skipped).
        ``context``: what else made this KV (tenant salt, LoRA adapter, images)."""
        self._check_open()
        self.spec.check(kv, len(tokens) - kv_offset)

        def fill(chunk: ChunkRange, dst: torch.Tensor) -> None:
            dst.copy_(kv[:, :, chunk.start - kv_offset : chunk.end - kv_offset])

        return self.store_chunks(tokens, fill, request_id, kv_offset, context)

    def store_chunks(
        self,
        tokens: Tokens,
        fill: ChunkFill,
        request_id: str | None = None,
        skip_tokens: int = 0,
        context: KVContext = PLAIN,
    ) -> int:
        """Store with a caller-provided copy: ``fill(chunk, dst)`` writes one chunk's KV into
        the pool slot ``dst`` (e.g. gathered straight from vLLM's paged GPU cache)."""
        self._check_open()
        stored = self.storage.store(self._new_chunks(tokens, skip_tokens, context), fill)
        if request_id is not None:
            log_store(request_id, stored, len(tokens))
        return stored

    def _new_chunks(
        self, tokens: Tokens, skip_tokens: int, context: KVContext = PLAIN
    ) -> list[ChunkRange]:
        return [c for c in self.chunks(tokens, context) if c.start >= skip_tokens]

    def reserve_chunks(self, tokens: Tokens, skip_tokens: int = 0) -> Reserved:
        """Phase one of a two-phase store: private pool slots for the chunks of ``tokens``
        not stored yet. The caller fills each ``buffer.kv()`` (e.g. with asynchronous copies
        from the GPU, all waited for once), then calls :meth:`commit_chunks`, or
        :meth:`abort_chunks` if the fill failed; until then nothing is visible or evictable."""
        self._check_open()
        return self.storage.reserve(self._new_chunks(tokens, skip_tokens))

    def commit_chunks(
        self, reserved: Reserved, request_id: str | None = None, total_tokens: int = 0
    ) -> int:
        """Publish filled reserved chunks; returns tokens newly stored. ``request_id`` and
        ``total_tokens`` (the request's length) make the per-request store log line."""
        stored = self.storage.commit(reserved)
        if request_id is not None:
            log_store(request_id, stored, total_tokens)
        return stored

    def abort_chunks(self, reserved: Reserved) -> None:
        """Return reserved chunks' slots to the pool unpublished."""
        self.storage.abort(reserved)

    # -- lookup --------------------------------------------------------------------------

    def lookup(
        self, tokens: Tokens, request_id: str | None = None, context: KVContext = PLAIN
    ) -> int:
        """Length in tokens of the longest prefix of ``tokens`` held by any tier."""
        return self.lookup_chunks(self.chunks(tokens, context), len(tokens), request_id)

    def lookup_chunks(
        self, chunks: list[ChunkRange], total_tokens: int, request_id: str | None = None
    ) -> int:
        """:meth:`lookup` for chunks from :meth:`chunks`: a caller that asks about the same
        prompt again (vLLM re-checks waiting requests every step) hashes it only once."""
        self._check_open()
        found, in_cpu = self.storage.lookup([c.key for c in chunks])
        hit = chunks[found - 1].end if found else 0
        self.metrics.lookup(total_tokens, hit)
        if request_id is not None:
            log_lookup(request_id, total_tokens, hit, hit)
        if self.config.prefetch and found > in_cpu:
            self._prefetcher.submit(self._prefetch, chunks[:found])
        return hit

    # -- retrieve ------------------------------------------------------------------------

    @contextmanager
    def retrieve_chunks(
        self, tokens: Tokens, max_tokens: int | None = None
    ) -> Iterator[list[tuple[ChunkRange, torch.Tensor]]]:
        """Pinned KV views of the longest cached prefix, chunk by chunk, valid inside the
        ``with`` block: the caller copies them where it needs them (zero extra copies)."""
        chunks = self.chunks(tokens)
        if max_tokens is not None:
            chunks = [c for c in chunks if c.end <= max_tokens]
        buffers = self.storage.acquire(chunks)
        try:
            views = [(c, b.kv()) for c, b in zip(chunks, buffers, strict=False)]
            nbytes = sum(b.nbytes for b in buffers)
            hit = views[-1][0].end if views else 0
            self.metrics.retrieve(chunks[-1].end if chunks else 0, hit, nbytes)
            yield views
        finally:
            self.storage.release_all(buffers)

    def retrieve(self, tokens: Tokens, out: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
        """(n, KV of ``tokens[:n]``) for the longest cached prefix; ``out`` (shaped for all of
        ``tokens``, of the engine's dtype) avoids an allocation, and the result is then a
        view of it."""
        if out is not None:
            self.spec.check(out, len(tokens))
        with self.retrieve_chunks(tokens) as views:
            n = views[-1][0].end if views else 0
            if out is None:
                out = torch.empty(self.spec.shape(n), dtype=self.spec.dtype)
            for chunk, kv in views:
                out[:, :, chunk.start : chunk.end].copy_(kv)
        return n, out[:, :, :n]

    # -- prefetch ------------------------------------------------------------------------

    def prefetch(self, tokens: Tokens) -> PrefetchHandle:
        """Start loading the disk/remote part of a cached prefix into CPU; returns at once."""
        self._check_open()
        return PrefetchHandle(self._prefetcher.submit(self._prefetch, self.chunks(tokens)))

    def _prefetch(self, chunks: list[ChunkRange]) -> int:
        if not self.config.local_cpu:
            return 0
        buffers = self.storage.acquire(chunks)
        self.storage.release_all(buffers)
        return chunks[len(buffers) - 1].end if buffers else 0

    # -- lifecycle -----------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until background writes to disk/remote are done."""
        self._check_open()
        return self.storage.flush(timeout)

    def close(self) -> None:
        """Finish background work and free the pool; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        self.storage.close()
        self.metrics.close()

    def __enter__(self) -> LMCacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["LMCacheEngine", "PrefetchHandle"]
