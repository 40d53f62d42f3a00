"""Memory arithmetic: LMCache's pinned pool in hugepages or in the container's memory.

LMCache sizes are per engine process, and vLLM runs one engine per tensor-parallel rank,
so a pod needs the pool once per rank.
"""

from __future__ import annotations

import math
from fractions import Fraction

from lmcache_operator import quantity
from lmcache_operator.spec import Spec

HUGEPAGE_BYTES = 2 << 20


def pages_per_rank(max_local_cpu_size_gb: float) -> int:
    """ceil(size·2^30 / 2 MiB): 5 GB → 2560 pages, as the engine maps them."""
    return math.ceil(max_local_cpu_size_gb * quantity.GIB / HUGEPAGE_BYTES)


def pool_bytes_per_pod(spec: Spec) -> int:
    """The pinned pool of every engine in the pod, rounded up to whole 2 MiB pages."""
    pages = pages_per_rank(spec.lmcache.max_local_cpu_size) * spec.engine_processes
    return pages * HUGEPAGE_BYTES


def hugepages_per_pod(spec: Spec) -> int:
    """`hugepages-2Mi` bytes to request (= limit); 0 when the pool is ordinary memory."""
    return pool_bytes_per_pod(spec) if spec.lmcache.hugepages else 0


def container_memory_bytes(spec: Spec) -> int:
    """vLLM's own memory, /dev/shm (tmpfs pages are charged to the container) and, without
    hugepages, the pinned pool vLLM's engines allocate from the container's memory."""
    total = quantity.parse(spec.vllm_memory) + quantity.parse(spec.shm_size)
    if not spec.lmcache.hugepages:
        total += pool_bytes_per_pod(spec)
    return math.ceil(total)


def container_memory(spec: Spec) -> str:
    return quantity.format_binary(container_memory_bytes(spec))


def disk_volume_bytes(size_gb: float, engine_processes: int) -> int:
    """The disk tier's volume: its GB (2^30) for each engine process (every TP rank keeps its
    own disk tier of that size in its own folder) plus 10% for file-system and index
    overhead, because an emptyDir over its sizeLimit gets the whole pod evicted."""
    total = Fraction(size_gb) * engine_processes * quantity.GIB * Fraction(11, 10)
    return math.ceil(total / (1 << 20)) << 20


def disk_tier_bytes(spec: Spec) -> int:
    """The disk tier's volume, 0 without one."""
    disk = spec.lmcache.local_disk
    if not (disk.enabled and disk.size):
        return 0
    return disk_volume_bytes(disk.size, spec.engine_processes)


def ephemeral_storage_bytes(spec: Spec) -> int:
    """Node disk a pod uses: the writable layer and logs (`resources.ephemeralStorage`) plus
    every emptyDir on disk (model cache, disk tier). PVC-backed volumes are not node disk."""
    total = quantity.parse(spec.resources.ephemeral_storage)
    cache = spec.model_cache
    if not (cache.claim_name or cache.storage_class):
        total += quantity.parse(cache.size)
    if not spec.lmcache.local_disk.storage_class:
        total += disk_tier_bytes(spec)
    return math.ceil(total)
