"""KV transfer between vLLM's paged KV cache and the engine's chunk buffers, by slot id.

A slot id is ``block_id * block_size + offset``, vLLM's own slot mapping; every layout is
addressed through the layers' strides (NHD or HND), without a copy of the cache. Transfers are
batched: chunks of equal length share one device staging tensor, gathered or scattered on CUDA
by one Triton launch for every layer (``kernels.py``; PyTorch indexing, one kernel per layer,
on CPU and with ``fused=False``), and each chunk crosses the bus as one large DMA between its
staging block and its pinned pool slot. On CUDA the kernels run on a transfer stream and the
DMAs (``non_blocking=True``) on a copy stream, overlapped batch by batch, and nothing waits on
the CPU: a store returns a timed transfer the worker polls before it publishes the chunks; a
load makes the compute stream wait (per layer with ``use_layerwise``). On CPU tensors the same code
runs synchronously."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmcache.spec import KVSpec
from lmcache.storage.manager import Reserved

if TYPE_CHECKING:
    from lmcache.integration.vllm.kernels import SlotCopier


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

    @property
    def strides(self) -> tuple[int, int, int, int, int]:
        """Element strides of one layer as (kv, block, offset, head, dim); 0 where the layout
        has no such axis (MLA has no K/V split and one "head")."""
        s = self.layers[0].stride()
        if self.layout is PagedLayout.KV_FIRST:
            return s[0], s[1], s[2], s[3], s[4]
        if self.layout is PagedLayout.BLOCK_FIRST:
            return s[1], s[0], s[2], s[3], s[4]
        return 0, s[0], s[1], 0, s[2]

    def to_device(self, slots: torch.Tensor) -> torch.Tensor:
        """Slot ids on the cache's device. On CUDA they go through pinned memory: a copy from
        pageable memory may wait for the stream's queued work, stalling the CPU."""
        slots = slots.to(torch.long)
        if self.device.type == "cuda" and slots.device.type == "cpu":
            slots = slots.pin_memory()  # kept alive by PyTorch until the copy has run
        return slots.to(self.device, non_blocking=True)

    def index(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) index tensors for slot ids (on the cache's device) of any shape
        ``[..., n]``."""
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


STAGING_BYTES = 128 << 20
"""Device staging of one direction (two buffers used in turn; loads and stores each have
their own, so a load never waits behind a store): bounds what transfers borrow from vLLM's
GPU memory. Allocated once, with the KV caches, not inside a step. Measured on an H200:
128-512 MiB in all keep the DMAs back to back; 64 MiB and less leave the copy engine waiting
on kernel launches."""


@dataclass(frozen=True)
class Issued:
    """A transfer queued on the device. ``done`` completes once its last copy has run;
    with ``started``, recorded where its first copy was queued, it times the transfer on the
    GPU (the worker sees it land a step or more later: a CPU clock would count the steps)."""

    started: torch.cuda.Event
    done: torch.cuda.Event

    def landed(self) -> bool:
        return self.done.query()

    def seconds(self) -> float:
        """From the transfer's start to its last copy (once landed)."""
        return self.started.elapsed_time(self.done) / 1e3


@dataclass(frozen=True)
class ChunkJob:
    """One contiguous piece of a transfer: ``kv[:, :, lo:hi]`` of a pinned chunk to or from
    ``slots`` (``hi - lo`` slot ids)."""

    kv: torch.Tensor
    lo: int
    hi: int
    slots: torch.Tensor


def store_jobs(reserved: Reserved, slots: torch.Tensor, first_token: int = 0) -> list[ChunkJob]:
    """The copies that fill reserved chunks of one request whose token ``first_token + i``
    sits at ``slots[i]``."""
    return [
        ChunkJob(b.kv(), 0, c.num_tokens, slots[c.start - first_token : c.end - first_token])
        for c, b in reserved
    ]


def _staged_bytes(jobs: Sequence[ChunkJob], num_layers: int) -> int:
    """Device staging for ``num_layers`` layers of ``jobs`` (chunks of one length)."""
    return len(jobs) * jobs[0].kv.nbytes // jobs[0].kv.shape[0] * num_layers


@dataclass(frozen=True)
class _Batch:
    """Jobs with the same chunk length and range, with their slots as ``[m, hi-lo]`` on the
    cache's device: one staging tensor and one gather or scatter serve all of them."""

    jobs: list[ChunkJob]
    slots: torch.Tensor

    @property
    def lo(self) -> int:
        return self.jobs[0].lo

    @property
    def hi(self) -> int:
        return self.jobs[0].hi


class _Direction:
    """One direction's streams and staging ring: a kernel stream (gathers or scatters) and a
    copy stream (DMAs between staging and pinned memory), and the event after which each
    staging buffer may be refilled. The events persist across steps, so a transfer issued
    while the last one is still in flight waits for it on the GPU, never on the CPU."""

    def __init__(self, device: torch.device, staging_bytes: int) -> None:
        self.kernel = torch.cuda.Stream(device)
        self.copy = torch.cuda.Stream(device)
        half = staging_bytes // 2
        self.ring = [torch.empty(half, dtype=torch.uint8, device=device) for _ in range(2)]
        self.free: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def buffer(self, nbytes: int) -> tuple[int, torch.Tensor]:
        """The next staging buffer (grown if one batch needs more: a chunk larger than half
        the ring); the caller waits for ``free[i]`` before writing it."""
        i, self.turn = self.turn, 1 - self.turn
        if self.ring[i].numel() < nbytes:
            # The old buffer was allocated on another stream than the ones still using it: tell
            # the caching allocator, or it hands the memory out again before they are done.
            old = self.ring[i]
            old.record_stream(self.kernel)
            old.record_stream(self.copy)
            # Allocated on the kernel stream after the buffer's last reader is done with it;
            # the copy stream, which may write it first, waits for that too.
            with torch.cuda.stream(self.kernel):
                self.wait_free(self.kernel, i)
                self.ring[i] = torch.empty(nbytes, dtype=torch.uint8, device=old.device)
            self.copy.wait_stream(self.kernel)
        return i, self.ring[i]

    def wait_free(self, stream: torch.cuda.Stream, i: int) -> None:
        """Order ``stream`` after the last use of staging buffer ``i``."""
        event = self.free[i]
        if event is not None:
            stream.wait_event(event)


class PagedTransfer:
    """Copies between a :class:`PagedKVCache` and pinned ``[layers, kv, n, heads, head]``
    chunk views, on CPU synchronously and on CUDA asynchronously, through the same code.

    On CUDA, per direction, gathers and scatters run on a kernel stream and the DMAs between
    device staging and pinned memory on a copy stream, through two staging buffers used in
    turn: the copy engine moves one batch while the kernels work on the next. Stores and
    loads use separate streams and buffers, so PCIe carries both directions at once.
    Completion is an event the caller polls: nothing here waits on the CPU.
    """

    def __init__(
        self, cache: PagedKVCache, staging_bytes: int = STAGING_BYTES, fused: bool = True
    ) -> None:
        """``fused``: on CUDA, gather and scatter with the one-launch Triton kernel (else
        with PyTorch indexing, one gather or scatter per layer: kept for comparison)."""
        self.cache = cache
        cuda = cache.device.type == "cuda"
        self._store = _Direction(cache.device, staging_bytes) if cuda else None
        self._load = _Direction(cache.device, staging_bytes) if cuda else None
        self._layer_events: list[torch.cuda.Event] = []
        self._copier: SlotCopier | None = None
        if cuda and fused:
            from lmcache.integration.vllm.kernels import SlotCopier

            self._copier = SlotCopier(cache.layers, cache.strides, cache.block_size)
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile the kernel's variants now, not in a request's step: slot 0 of every layer
        is copied out and back unchanged (before any request owns it)."""
        spec = self.cache.spec
        num_layers = len(self.cache.layers)
        probe = torch.empty(spec.shape(1), dtype=spec.dtype)
        slot = torch.zeros(1, dtype=torch.long)
        batch = self._batches([[ChunkJob(probe, 0, 1, slot)]])[0]
        staged = torch.empty((1, *spec.shape(1)), dtype=spec.dtype, device=self.cache.device)
        self._gather(staged, batch, 0, num_layers)
        self._scatter(staged, batch, 0, num_layers)
        self._scatter(staged[:, :1], batch, 0, 1)  # the layer-wise loads' shape
        torch.cuda.synchronize(self.cache.device)

    @staticmethod
    def _group(jobs: Sequence[ChunkJob], num_layers: int, budget: int) -> list[list[ChunkJob]]:
        """``jobs`` grouped by (chunk length, lo, hi) and split so that staging
        ``num_layers`` layers of a group fits ``budget`` bytes (at least one job a group)."""
        groups: dict[tuple[int, int, int], list[ChunkJob]] = {}
        for job in jobs:
            groups.setdefault((job.kv.shape[2], job.lo, job.hi), []).append(job)
        parts: list[list[ChunkJob]] = []
        for group in groups.values():
            size = max(1, budget // _staged_bytes(group[:1], num_layers))
            parts += [group[start : start + size] for start in range(0, len(group), size)]
        return parts

    def _batches(self, parts: list[list[ChunkJob]]) -> list[_Batch]:
        """The groups with their slot ids on the device, uploaded in one copy (on the current
        stream), not one per batch."""
        slots = self.cache.to_device(torch.cat([job.slots for part in parts for job in part]))
        batches, at = [], 0
        for part in parts:
            count = len(part) * (part[0].hi - part[0].lo)
            batches.append(_Batch(part, slots[at : at + count].view(len(part), -1)))
            at += count
        return batches

    def _gather(self, staged: torch.Tensor, batch: _Batch, first: int, num_layers: int) -> None:
        """Layers ``[first, first + num_layers)`` of the batch's slots into ``staged``
        (``[m, num_layers, kv, n, heads, head]``, positions ``lo:hi``)."""
        self._move(staged, batch, first, num_layers, to_staging=True)

    def _scatter(self, staged: torch.Tensor, batch: _Batch, first: int, num_layers: int) -> None:
        self._move(staged, batch, first, num_layers, to_staging=False)

    def _move(
        self, staged: torch.Tensor, batch: _Batch, first: int, num_layers: int, to_staging: bool
    ) -> None:
        lo, hi = batch.lo, batch.hi
        if self._copier is not None:  # one launch for every layer of the batch
            spec = self.cache.spec
            self._copier(
                staged,
                batch.slots.flatten(),
                hi - lo,
                staged.shape[3],
                lo,
                first,
                num_layers,
                spec.kv_factor,
                spec.num_kv_heads,
                spec.head_size,
                to_staging,
            )
            return
        index = self.cache.index(batch.slots)
        for layer in range(num_layers):
            if to_staging:
                staged[:, layer, :, lo:hi] = self.cache.read(first + layer, index)
            else:
                self.cache.write(first + layer, index, staged[:, layer, :, lo:hi])

    def _view(self, buffer: torch.Tensor, jobs: list[ChunkJob], num_layers: int) -> torch.Tensor:
        """A staging buffer as ``[m, num_layers, kv, n, heads, head]`` for a batch's jobs."""
        spec = self.cache.spec
        shape = (len(jobs), num_layers, *spec.shape(jobs[0].kv.shape[2])[1:])
        return buffer.view(spec.dtype)[: math.prod(shape)].view(shape)

    @staticmethod
    def _record(stream: torch.cuda.Stream, timing: bool = False) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=timing)
        event.record(stream)
        return event

    def _budget(self, direction: _Direction | None) -> int:
        return direction.ring[0].numel() if direction is not None else 1 << 62

    # -- store (paged -> pinned) ---------------------------------------------------------

    def store(self, jobs: Sequence[ChunkJob]) -> Issued | None:
        """Copy the KV at each job's slots into its pinned chunk.

        On CPU the copies are done on return (None). On CUDA they are queued after the
        compute stream's work so far (the forward pass that wrote the KV) and the returned
        transfer lands once every byte is in pinned memory; the caller keeps the chunks
        unpublished, and vLLM's blocks unfreed, until then.
        """
        if not jobs:
            return None
        cache = self.cache
        num_layers = len(cache.layers)
        d = self._store
        if d is None:
            for batch in self._batches(self._group(jobs, num_layers, self._budget(d))):
                index = cache.index(batch.slots)
                for layer in range(num_layers):
                    kv = cache.read(layer, index)
                    for job, chunk in zip(batch.jobs, kv, strict=True):
                        job.kv[layer, :, batch.lo : batch.hi].copy_(chunk)
            return None
        d.kernel.wait_stream(torch.cuda.current_stream(cache.device))
        started = self._record(d.kernel, timing=True)
        with torch.cuda.stream(d.kernel):
            batches = self._batches(self._group(jobs, num_layers, self._budget(d)))
        for batch in batches:
            lo, hi = batch.lo, batch.hi
            i, buffer = d.buffer(_staged_bytes(batch.jobs, num_layers))
            with torch.cuda.stream(d.kernel):
                d.wait_free(d.kernel, i)  # its last batch is on the host
                staged = self._view(buffer, batch.jobs, num_layers)
                self._gather(staged, batch, 0, num_layers)
                gathered = self._record(d.kernel)
            with torch.cuda.stream(d.copy):
                d.copy.wait_event(gathered)
                for job, chunk in zip(batch.jobs, staged, strict=True):
                    job.kv[:, :, lo:hi].copy_(chunk[:, :, lo:hi], non_blocking=True)
                d.free[i] = self._record(d.copy)
        return Issued(started, self._record(d.copy, timing=True))

    def fence(self, store: Issued | None) -> None:
        """Make the compute stream wait for a store (no CPU stall): before vLLM's next
        forward may overwrite blocks it is still reading (a preempted request's)."""
        if store is not None:
            torch.cuda.current_stream(self.cache.device).wait_event(store.done)

    # -- load (pinned -> paged) ----------------------------------------------------------

    def start_load(self, jobs: Sequence[ChunkJob], layerwise: bool) -> Issued | None:
        """Issue every job's copies; the returned transfer lands when the pinned sources have
        been read (None on CPU, where the copies are done on return).

        ``layerwise``: layer by layer, with an event after each, so the forward pass runs
        layer 0 while later layers are still in flight (:meth:`wait_layer`). Otherwise all
        layers of a batch of chunks at once (one DMA per chunk), and the compute stream waits
        for all of them here (on the GPU: no CPU stall, and safe under full CUDA graphs).
        """
        cache = self.cache
        self._layer_events = []
        if not jobs:
            return None
        num_layers = len(cache.layers)
        d = self._load
        per_step = 1 if layerwise else num_layers
        parts = self._group(jobs, per_step, self._budget(d))
        if d is None:
            for batch in self._batches(parts):
                index = cache.index(batch.slots)
                for layer in range(num_layers):
                    kv = torch.stack([job.kv[layer, :, batch.lo : batch.hi] for job in batch.jobs])
                    cache.write(layer, index, kv)
            return None
        # The DMAs into staging wait for nothing but their buffer's last scatter (the ring's
        # events), so the first ones are queued before anything else: the slot ids, and the
        # scatters, on the kernel stream after the compute stream's work, follow.
        batches: list[_Batch] = []
        started = self._record(d.copy, timing=True)
        steps = [(k, layer) for layer in range(0, num_layers, per_step) for k in range(len(parts))]
        for n, (k, first) in enumerate(steps):
            part = parts[k]
            i, buffer = d.buffer(_staged_bytes(part, per_step))
            with torch.cuda.stream(d.copy):
                d.wait_free(d.copy, i)  # its last batch is scattered
                staged = self._view(buffer, part, per_step)
                for job, chunk in zip(part, staged, strict=True):
                    chunk.copy_(job.kv[first : first + per_step], non_blocking=True)
                arrived = self._record(d.copy)
            with torch.cuda.stream(d.kernel):
                if not batches:
                    d.kernel.wait_stream(torch.cuda.current_stream(cache.device))
                    batches = self._batches(parts)
                d.kernel.wait_event(arrived)
                self._scatter(staged, batches[k], first, per_step)
                d.free[i] = self._record(d.kernel)
            if layerwise and (n + 1) % len(parts) == 0:
                self._layer_events.append(self._record(d.kernel))
        if not layerwise:
            torch.cuda.current_stream(cache.device).wait_stream(d.kernel)
        return Issued(started, self._record(d.copy, timing=True))

    def wait_layer(self, layer: int) -> None:
        """Make the compute stream wait for layer ``layer``'s loaded KV (no CPU stall)."""
        if layer < len(self._layer_events):
            torch.cuda.current_stream(self.cache.device).wait_event(self._layer_events[layer])
