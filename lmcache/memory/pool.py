"""The pinned CPU pool: allocated once at start, sub-allocated into fixed-size chunk slots.

Fixed-size slots (one full chunk each) make fragmentation impossible: any free slot fits any
chunk, so an allocation fails only when every slot is in use. The same slots hold the CPU hot
cache and stage transfers to and from disk and the remote tier.
"""

from __future__ import annotations

import logging
import mmap
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lmcache.config import ConfigError, LMCacheEngineConfig
from lmcache.memory.hugepages import map_hugepages
from lmcache.spec import KVSpec

logger = logging.getLogger("lmcache")

_CGROUP_LIMITS = (
    (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
    (
        Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
        Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ),
)


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes this process can still commit: the host's MemAvailable, or less under a
    cgroup (container) memory limit; None when neither can be read."""
    found: list[int] = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_path, usage_path in _CGROUP_LIMITS:
        try:
            limit_text = limit_path.read_text().strip()
            usage = int(usage_path.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text != "max" and int(limit_text) < (1 << 60):
            found.append(max(0, int(limit_text) - usage))
        break
    return min(found) if found else None


@dataclass
class ChunkBuffer:
    """One slot of the pool holding ``num_tokens`` tokens of KV.

    ``refs`` counts holders that keep it from being evicted or freed: the CPU cache index
    (while cached), in-flight loads, and pending write-backs to lower tiers. ``key`` is set
    while the CPU cache indexes it.
    """

    pool: MemoryPool
    slot: int
    num_tokens: int = 0
    refs: int = 0
    key: str | None = None

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.pool.spec.bytes_per_token

    def kv(self) -> torch.Tensor:
        """The KV view ``[num_layers, kv_factor, num_tokens, heads, head_size]`` of the slot."""
        return self.pool.kv(self.slot, self.num_tokens)

    def raw(self, nbytes: int | None = None) -> torch.Tensor:
        """The slot's first ``nbytes`` bytes (default: the used bytes) as uint8."""
        return self.pool.slot_bytes(self.slot)[: self.nbytes if nbytes is None else nbytes]


class MemoryPool:
    """``capacity`` bytes carved into ``num_slots`` slots of one full chunk each."""

    def __init__(
        self, config: LMCacheEngineConfig, spec: KVSpec, hugepages_without_cuda: bool = False
    ) -> None:
        """``hugepages_without_cuda`` maps hugepages even on a CPU-only host (tests of the
        mapping); the engine never sets it, following the seed's fallback rule."""
        self.spec = spec
        self.slot_size = config.chunk_size * spec.bytes_per_token
        capacity = config.max_local_cpu_bytes
        self.num_slots = capacity // self.slot_size
        if self.num_slots < 1:
            raise ConfigError(
                f"max_local_cpu_size: {config.max_local_cpu_size:g} GB "
                f"({config.source_of('max_local_cpu_size')}) holds no chunk of this model; "
                f"allowed: at least {self.slot_size / (1 << 30):.4f} GB "
                f"(chunk_size={config.chunk_size} x {spec.bytes_per_token} bytes per token)"
            )
        self.capacity = self.num_slots * self.slot_size
        self._mapping: mmap.mmap | None = None
        self._registered = False
        self.hugepages = False
        self.pinned = False
        try:
            self._buffer = self._allocate(config, hugepages_without_cuda)
        except (RuntimeError, MemoryError, OSError) as err:
            raise ConfigError(self._allocation_error(config, str(err))) from None
        # Every slot's full-chunk view, made once: building one costs ~15 us of CPU, and a
        # transfer of a long prompt needs dozens of them before its first copy can start.
        self._full_views = list(
            self._buffer.view(spec.dtype).view(self.num_slots, *spec.shape(config.chunk_size))
        )
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._lock = threading.Lock()

    def _allocation_error(self, config: LMCacheEngineConfig, reason: str) -> str:
        return (
            f"max_local_cpu_size: {config.max_local_cpu_size:g} GB "
            f"({config.source_of('max_local_cpu_size')}) asks for a {self.capacity}-byte pool "
            f"that cannot be allocated: {reason}; allowed: a size this host (and the "
            f"container's memory limit) can hold besides vLLM"
        )

    def _allocate(self, config: LMCacheEngineConfig, hugepages_without_cuda: bool) -> torch.Tensor:
        cuda = torch.cuda.is_available()
        if config.local_cpu_use_hugepages and not (cuda or hugepages_without_cuda):
            logger.warning(
                "local_cpu_use_hugepages is not supported on a non-CUDA platform; "
                "using a regular allocation for the %d-byte pool",
                self.capacity,
            )
        elif config.local_cpu_use_hugepages:
            origin = str(config.source_of("local_cpu_use_hugepages"))
            self._mapping = map_hugepages(self.capacity, origin)
            buffer = torch.frombuffer(self._mapping, dtype=torch.uint8)[: self.capacity]
            self.hugepages = True
            if cuda:
                self._register(buffer)
            return buffer
        # Commit the pages now: no page faults on the request path, and a pod over its memory
        # limit fails at start-up rather than mid-request. Checked first: touching more than
        # the host or the container has gets the process OOM-killed, with no message at all.
        available = available_memory()
        if available is not None and self.capacity > available:
            raise ConfigError(
                self._allocation_error(config, f"only {available} bytes are available")
            )
        buffer = torch.zeros(self.capacity, dtype=torch.uint8)
        if cuda:
            # Not torch's pin_memory=True: its caching host allocator rounds every block up to a
            # power of two, so a 5 GB pool would lock 8 GiB. Registering locks exactly our bytes.
            self._register(buffer)
        return buffer

    def _register(self, buffer: torch.Tensor) -> None:
        """Page-lock the pool with CUDA so copies to and from the GPU are DMA, not staged."""
        err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of the {buffer.numel()}-byte pool failed: {err}")
        self._registered = self.pinned = True

    def slot_bytes(self, slot: int) -> torch.Tensor:
        start = slot * self.slot_size
        return self._buffer[start : start + self.slot_size]

    def kv(self, slot: int, num_tokens: int) -> torch.Tensor:
        """Slot ``slot`` holding ``num_tokens`` tokens as ``[num_layers, kv_factor,
        num_tokens, heads, head_size]`` (a partial chunk packs its tokens at the start)."""
        nbytes = num_tokens * self.spec.bytes_per_token
        if nbytes == self.slot_size:
            return self._full_views[slot]
        raw = self.slot_bytes(slot)[:nbytes]
        return raw.view(self.spec.dtype).view(self.spec.shape(num_tokens))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_bytes(self) -> int:
        return (self.num_slots - len(self._free)) * self.slot_size

    def allocate(self, num_tokens: int) -> ChunkBuffer | None:
        """A free slot for ``num_tokens`` tokens, or None when the pool is full."""
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
        return ChunkBuffer(self, slot, num_tokens, refs=1)

    def free(self, buffer: ChunkBuffer) -> None:
        with self._lock:
            self._free.append(buffer.slot)

    def close(self) -> None:
        """Unregister and unmap; the pool must not be used afterwards."""
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self._buffer.data_ptr())
            self._registered = False
        self._full_views = []
        del self._buffer
        if self._mapping is not None:
            mapping, self._mapping = self._mapping, None
            try:
                mapping.close()
            except BufferError:
                logger.debug("hugepage mapping still referenced; the OS frees it at exit")
