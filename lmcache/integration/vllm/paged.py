"""KV transfer between vLLM's paged KV cache and the engine's chunk buffers, by slot id.

A slot id is ``block_id * block_size + offset``, vLLM's own slot mapping. Each layer's paged
tensor is indexed with (block, offset) pairs, so any stride order (NHD or HND) works without
a copy of the cache. Transfers are batched: chunks of equal length share one device staging
tensor and one gather or scatter kernel per layer, and each chunk crosses the bus as one
large DMA between its staging block and its pinned pool slot. On CUDA the kernels run on a
transfer stream and the DMAs (``non_blocking=True``) on a copy stream, overlapped batch by
batch; a store waits once for the whole step, a layer-wise load records one event per layer
so each attention layer waits only for its own KV. On CPU tensors the same code runs
synchronously.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from lmcache.spec import KVSpec
from lmcache.storage.manager import Reserved


class PagedLayout(enum.Enum):
    """The per-layer paged KV layouts vLLM's attention backends allocate."""

    KV_FIRST = "[2, num_blocks, block_size, num_kv_heads, head_size]"
    BLOCK_FIRST = "[num_blocks, 2, block_size, num_kv_heads, head_size]"
    MLA = "[num_blocks, block_size, head_size]"


def detect_layout(shape: Sequence[int]) -> PagedLayout:
    """The layout of one layer's paged tensor, from its shape alone.

    ``[2, 2, ...]`` is ambiguous (a two-block cache); vLLM never allocates one that small.
    """
    if len(shape) == 3:
        return PagedLayout.MLA
    if len(shape) == 5:
        if shape[0] == 2 and shape[1] != 2:
            return PagedLayout.KV_FIRST
        if shape[1] == 2 and shape[0] != 2:
            return PagedLayout.BLOCK_FIRST
    allowed = "; ".join(layout.value for layout in PagedLayout)
    raise ValueError(f"unsupported paged KV cache shape {tuple(shape)}; allowed: {allowed}")


class PagedKVCache:
    """vLLM's per-layer paged KV tensors (one shard of one model), in layer order."""

    def __init__(self, layers: Sequence[torch.Tensor]) -> None:
        if not layers:
            raise ValueError("no KV cache layers registered")
        first = layers[0]
        for layer in layers[1:]:
            if layer.shape != first.shape or layer.dtype != first.dtype:
                raise ValueError(
                    f"KV cache layers differ: {tuple(first.shape)} {first.dtype} vs "
                    f"{tuple(layer.shape)} {layer.dtype}; allowed: one shape for all layers "
                    f"(hybrid/sliding-window groups are not supported)"
                )
        self.layers = list(layers)
        self.layout = detect_layout(first.shape)
        self.device = first.device
        shape = first.shape
        if self.layout is PagedLayout.MLA:
            self.block_size = shape[1]
            self.spec = KVSpec.mla(len(layers), shape[2], first.dtype)
        else:
            self.block_size = shape[2]
            self.spec = KVSpec(len(layers), shape[3], shape[4], first.dtype)

    def index(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) index tensors on the cache's device for slot ids of any shape
        ``[..., n]``. On CUDA the ids go through pinned memory: a copy from pageable memory
        may wait for the stream's queued work, stalling the CPU."""
        slots = slots.to(torch.long)
        if self.device.type == "cuda" and slots.device.type == "cpu":
            slots = slots.pin_memory()  # kept alive by PyTorch until the copy has run
        slots = slots.to(self.device, non_blocking=True)
        return slots // self.block_size, slots % self.block_size

    def read(self, layer: int, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One layer's KV at the indexed slots (index shape ``[..., n]``) as
        ``[..., kv_factor, n, num_kv_heads, head_size]``."""
        blocks, offsets = index
        paged = self.layers[layer]
        if self.layout is PagedLayout.KV_FIRST:
            return paged[:, blocks, offsets].movedim(0, -4)
        if self.layout is PagedLayout.BLOCK_FIRST:
            return paged[blocks, :, offsets].transpose(-4, -3)
        return paged[blocks, offsets].unsqueeze(-2).unsqueeze(-4)

    def write(self, layer: int, index: tuple[torch.Tensor, torch.Tensor], kv: torch.Tensor) -> None:
        """Write ``kv`` (``[..., kv_factor, n, num_kv_heads, head_size]``) into the indexed
        slots (index shape ``[..., n]``)."""
        blocks, offsets = index
        paged = self.layers[layer]
        if self.layout is PagedLayout.KV_FIRST:
            paged[:, blocks, offsets] = kv.movedim(-4, 0)
        elif self.layout is PagedLayout.BLOCK_FIRST:
            paged[blocks, :, offsets] = kv.transpose(-4, -3)
        else:
            paged[blocks, offsets] = kv[..., 0, :, 0, :]


STAGING_BYTES = 256 << 20
"""Device staging a transfer uses at most (two buffers, or two chunks if larger), besides one
layer of one batch in indexing temporaries: bounds what a transfer borrows from vLLM's GPU
memory. Measured on an H200: 128-512 MiB all keep the DMAs back to back; 64 MiB and less
leave the copy engine waiting on kernel launches."""


@dataclass(frozen=True)
class ChunkJob:
    """One contiguous piece of a transfer: ``kv[:, :, lo:hi]`` of a pinned chunk to or from
    ``slots`` (``hi - lo`` slot ids)."""

    kv: torch.Tensor
    lo: int
    hi: int
    slots: torch.Tensor


def store_jobs(reserved: Reserved, slots: torch.Tensor) -> list[ChunkJob]:
    """The copies that fill reserved chunks of one request whose token ``i`` sits at
    ``slots[i]``."""
    return [ChunkJob(b.kv(), 0, c.num_tokens, slots[c.start : c.end]) for c, b in reserved]


@dataclass(frozen=True)
class _Batch:
    """Jobs with the same chunk length and range, with their slots indexed as ``[m, hi-lo]``:
    one staging tensor and one gather or scatter per layer serve all of them."""

    jobs: list[ChunkJob]
    index: tuple[torch.Tensor, torch.Tensor]

    @property
    def lo(self) -> int:
        return self.jobs[0].lo

    @property
    def hi(self) -> int:
        return self.jobs[0].hi


class PagedTransfer:
    """Copies between a :class:`PagedKVCache` and pinned ``[layers, kv, n, heads, head]``
    chunk views, on CPU synchronously and on CUDA asynchronously, through the same code.

    On CUDA, gathers and scatters run on a kernel stream and the DMAs between device staging
    and pinned memory on a copy stream, through two staging buffers used in turn: the copy
    engine moves one batch while the kernels work on the next. Events order the two streams
    per batch: a buffer is refilled only after the other stream is done with it.
    """

    def __init__(self, cache: PagedKVCache, staging_bytes: int = STAGING_BYTES) -> None:
        self.cache = cache
        self.staging_bytes = staging_bytes
        cuda = cache.device.type == "cuda"
        self.stream = torch.cuda.Stream(cache.device) if cuda else None
        self.copy_stream = torch.cuda.Stream(cache.device) if cuda else None
        self._layer_events: list[torch.cuda.Event] = []

    @staticmethod
    def _on(stream: torch.cuda.Stream | None) -> AbstractContextManager[object]:
        return torch.cuda.stream(stream) if stream is not None else nullcontext()

    @staticmethod
    def _record(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    @staticmethod
    def _wait(stream: torch.cuda.Stream | None, event: torch.cuda.Event | None) -> None:
        if stream is not None and event is not None:
            stream.wait_event(event)

    def _begin(
        self, num_layers: int, jobs: Sequence[ChunkJob]
    ) -> tuple[list[_Batch], list[torch.Tensor]]:
        """Order the kernel stream after the compute stream's queued work, index the jobs and
        allocate the two staging buffers on it; then order the copy stream after it, since
        the buffers may reuse memory that earlier kernel-stream work still touches."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.cache.device))
        with self._on(self.stream):
            batches = self._batches(jobs, num_layers)
            nbytes = max(len(b.jobs) * b.jobs[0].kv[:num_layers].nbytes for b in batches)
            device = self.cache.device
            ring = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
        if self.copy_stream is not None and self.stream is not None:
            self.copy_stream.wait_stream(self.stream)
        return batches, ring

    def _batches(self, jobs: Sequence[ChunkJob], num_layers: int) -> list[_Batch]:
        """``jobs`` grouped by (chunk length, lo, hi) and split so that staging
        ``num_layers`` layers of a batch fits one of the two staging buffers."""
        groups: dict[tuple[int, int, int], list[ChunkJob]] = {}
        for job in jobs:
            groups.setdefault((job.kv.shape[2], job.lo, job.hi), []).append(job)
        batches = []
        for group in groups.values():
            per_job = group[0].kv[:num_layers].nbytes
            size = max(1, self.staging_bytes // 2 // per_job)
            for start in range(0, len(group), size):
                part = group[start : start + size]
                slots = torch.stack([job.slots for job in part])
                batches.append(_Batch(part, self.cache.index(slots)))
        return batches

    def _view(self, buffer: torch.Tensor, batch: _Batch, num_layers: int) -> torch.Tensor:
        """A staging buffer as ``[m, num_layers, kv, n, heads, head]`` for ``batch``."""
        spec = self.cache.spec
        shape = (len(batch.jobs), num_layers, *spec.shape(batch.jobs[0].kv.shape[2])[1:])
        return buffer.view(spec.dtype)[: math.prod(shape)].view(shape)

    def _synchronize(self) -> None:
        for stream in (self.stream, self.copy_stream):
            if stream is not None:
                stream.synchronize()

    # -- store (paged -> pinned) ---------------------------------------------------------

    def store(self, jobs: Sequence[ChunkJob]) -> None:
        """Copy the KV at each job's slots into its pinned chunk; complete on return.

        Ordered after the forward pass that wrote the KV. Per batch: one gather per layer
        into staging, then one DMA per chunk; the CPU waits once, at the end, because the
        engine publishes the chunks as soon as this returns.
        """
        if not jobs:
            return
        cache = self.cache
        num_layers = len(cache.layers)
        batches, ring = self._begin(num_layers, jobs)
        drained: list[torch.cuda.Event | None] = [None, None]
        try:
            for i, batch in enumerate(batches):
                buffer = i % 2
                lo, hi = batch.lo, batch.hi
                with self._on(self.stream):
                    self._wait(self.stream, drained[buffer])  # its last batch is on the host
                    staged = self._view(ring[buffer], batch, num_layers)
                    for layer in range(num_layers):
                        staged[:, layer, :, lo:hi] = cache.read(layer, batch.index)
                    gathered = self._record(self.stream)
                with self._on(self.copy_stream):
                    self._wait(self.copy_stream, gathered)
                    for job, chunk in zip(batch.jobs, staged, strict=True):
                        job.kv[:, :, lo:hi].copy_(chunk[:, :, lo:hi], non_blocking=True)
                    drained[buffer] = self._record(self.copy_stream)
        finally:
            # Also on failure: the caller frees the reserved slots, and copies already queued
            # into them must have landed before any slot is reused.
            self._synchronize()

    # -- load (pinned -> paged) ----------------------------------------------------------

    def start_load(self, jobs: Sequence[ChunkJob], layerwise: bool) -> None:
        """Issue every job's copies.

        ``layerwise``: layer by layer, with an event after each, so the forward pass runs
        layer 0 while later layers are still in flight (:meth:`wait_layer`). Otherwise all
        layers of a batch of chunks at once (one DMA per chunk), and the compute stream waits
        for all of them here (on the GPU: no CPU stall, and safe under full CUDA graphs).
        The pinned sources must stay alive until :meth:`finish_load`.
        """
        cache = self.cache
        self._layer_events = []
        if not jobs:
            return
        num_layers = len(cache.layers)
        per_step = 1 if layerwise else num_layers
        batches, ring = self._begin(per_step, jobs)
        steps = [(b, layer) for layer in range(0, num_layers, per_step) for b in batches]
        drained: list[torch.cuda.Event | None] = [None, None]
        for i, (batch, first) in enumerate(steps):
            buffer = i % 2
            with self._on(self.copy_stream):
                self._wait(self.copy_stream, drained[buffer])  # its last batch is scattered
                staged = self._view(ring[buffer], batch, per_step)
                for job, chunk in zip(batch.jobs, staged, strict=True):
                    chunk.copy_(job.kv[first : first + per_step], non_blocking=True)
                arrived = self._record(self.copy_stream)
            with self._on(self.stream):
                self._wait(self.stream, arrived)
                for offset in range(per_step):
                    kv = staged[:, offset, :, batch.lo : batch.hi]
                    cache.write(first + offset, batch.index, kv)
                drained[buffer] = self._record(self.stream)
            if layerwise and (i + 1) % len(batches) == 0:
                self._record_layer()
        if self.stream is not None and not layerwise:
            torch.cuda.current_stream(cache.device).wait_stream(self.stream)

    def _record_layer(self) -> None:
        event = self._record(self.stream)
        if event is not None:
            self._layer_events.append(event)

    def wait_layer(self, layer: int) -> None:
        """Make the compute stream wait for layer ``layer``'s loaded KV (no CPU stall)."""
        if layer < len(self._layer_events):
            torch.cuda.current_stream(self.cache.device).wait_event(self._layer_events[layer])

    def finish_load(self) -> None:
        """Block until every issued load copy is done, so its pinned sources can be freed."""
        self._synchronize()
        self._layer_events = []
