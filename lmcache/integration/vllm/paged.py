"""KV transfer between vLLM's paged KV cache and the engine's chunk buffers, by slot id.

A slot id is ``block_id * block_size + offset``, vLLM's own slot mapping. Each layer's paged
tensor is indexed with (block, offset) pairs, so any stride order (NHD or HND) works without
a copy of the cache. On CUDA all copies run on one dedicated stream into or out of pinned
pool slots with ``non_blocking=True``; a layer-wise load records one event per layer so each
attention layer waits only for its own KV. On CPU tensors the same code runs synchronously.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from lmcache.spec import KVSpec


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
        """(block, offset) index tensors on the cache's device for the given slot ids."""
        slots = slots.to(self.device, torch.long, non_blocking=True)
        return slots // self.block_size, slots % self.block_size

    def read(self, layer: int, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One layer's KV at the indexed slots as ``[kv_factor, n, num_kv_heads, head_size]``."""
        blocks, offsets = index
        paged = self.layers[layer]
        if self.layout is PagedLayout.KV_FIRST:
            return paged[:, blocks, offsets]
        if self.layout is PagedLayout.BLOCK_FIRST:
            return paged[blocks, :, offsets].transpose(0, 1)
        return paged[blocks, offsets].unsqueeze(0).unsqueeze(2)

    def write(self, layer: int, index: tuple[torch.Tensor, torch.Tensor], kv: torch.Tensor) -> None:
        """Write ``kv`` (``[kv_factor, n, num_kv_heads, head_size]``) into the indexed slots."""
        blocks, offsets = index
        paged = self.layers[layer]
        if self.layout is PagedLayout.KV_FIRST:
            paged[:, blocks, offsets] = kv
        elif self.layout is PagedLayout.BLOCK_FIRST:
            paged[blocks, :, offsets] = kv.transpose(0, 1)
        else:
            paged[blocks, offsets] = kv[0, :, 0]


@dataclass(frozen=True)
class LoadJob:
    """One contiguous piece of a load: ``kv[:, :, lo:hi]`` of a pinned chunk to ``slots``."""

    kv: torch.Tensor
    lo: int
    hi: int
    slots: torch.Tensor


class PagedTransfer:
    """Copies between a :class:`PagedKVCache` and pinned ``[layers, kv, n, heads, head]``
    chunk views: on CUDA asynchronously on a dedicated stream, on CPU synchronously, through
    the same code (device-to-device steps become no-ops on CPU)."""

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self.stream = torch.cuda.Stream(cache.device) if cache.device.type == "cuda" else None
        self._layer_events: list[torch.cuda.Event] = []

    def _on_stream(self) -> AbstractContextManager[object]:
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def _after_compute(self) -> None:
        """Order the side stream after everything the compute stream has queued so far."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.cache.device))

    # -- store (paged -> pinned) ---------------------------------------------------------

    def begin_store(self) -> None:
        """Order the store copies after the forward pass that wrote the KV."""
        self._after_compute()

    def gather(self, slots: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the KV at ``slots`` into ``dst`` (a pinned chunk view); complete on return,
        because the engine publishes ``dst`` as soon as its fill returns. All layers are
        gathered on the device first, so the copy to the host is one large DMA."""
        cache = self.cache
        with self._on_stream():
            index = cache.index(slots)
            staged = dst if self.stream is None else torch.empty_like(dst, device=cache.device)
            for layer in range(len(cache.layers)):
                staged[layer].copy_(cache.read(layer, index))
            if staged is not dst:
                dst.copy_(staged, non_blocking=True)
        if self.stream is not None:
            self.stream.synchronize()

    # -- load (pinned -> paged) ----------------------------------------------------------

    def start_load(self, jobs: Sequence[LoadJob], layerwise: bool) -> None:
        """Issue every job's copies.

        ``layerwise``: layer by layer, with an event after each, so the forward pass runs
        layer 0 while later layers are still in flight (:meth:`wait_layer`). Otherwise chunk
        by chunk, one large DMA each, and the compute stream waits for all of them here (on
        the GPU: no CPU stall, and safe under full CUDA graphs).
        """
        cache = self.cache
        self._layer_events = []
        if not jobs:
            return
        self._after_compute()
        device = cache.device
        with self._on_stream():
            indexes = [cache.index(job.slots) for job in jobs]
            if layerwise:
                for layer in range(len(cache.layers)):
                    for job, index in zip(jobs, indexes, strict=True):
                        part = job.kv[layer, :, job.lo : job.hi].to(device, non_blocking=True)
                        cache.write(layer, index, part)
                    self._record_layer()
            else:
                for job, index in zip(jobs, indexes, strict=True):
                    chunk = job.kv.to(device, non_blocking=True)
                    for layer in range(len(cache.layers)):
                        cache.write(layer, index, chunk[layer, :, job.lo : job.hi])
        if self.stream is not None and not layerwise:
            torch.cuda.current_stream(device).wait_stream(self.stream)

    def _record_layer(self) -> None:
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(self.stream)
            self._layer_events.append(event)

    def wait_layer(self, layer: int) -> None:
        """Make the compute stream wait for layer ``layer``'s loaded KV (no CPU stall)."""
        if layer < len(self._layer_events):
            torch.cuda.current_stream(self.cache.device).wait_event(self._layer_events[layer])

    def finish_load(self) -> None:
        """Block until every issued load copy is done, so its pinned sources can be freed."""
        if self.stream is not None:
            self.stream.synchronize()
        self._layer_events = []
