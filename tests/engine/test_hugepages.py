"""The hugepage pool. Needs free 2 MiB hugepages (``sysctl -w vm.nr_hugepages=N`` as root);
`.ci/run` reserves some when it can. The GPU machine runs the CUDA-registered variant."""

from __future__ import annotations

import pytest
import torch

from lmcache import ConfigError, LMCacheEngine, LMCacheEngineConfig
from lmcache.memory.hugepages import HUGEPAGE_BYTES, read_meminfo
from lmcache.memory.pool import MemoryPool
from tests.engine.conftest import SPEC, random_kv, tokens

POOL_PAGES = 8


def config(pages: int) -> LMCacheEngineConfig:
    return LMCacheEngineConfig.from_mapping(
        {
            "chunk_size": 16,
            "local_cpu_use_hugepages": True,
            "max_local_cpu_size": pages * HUGEPAGE_BYTES / (1 << 30),
        }
    )


def free_pages() -> int:
    return read_meminfo().get("HugePages_Free", 0)


needs_hugepages = pytest.mark.skipif(
    free_pages() < POOL_PAGES,
    reason=f"needs {POOL_PAGES} free 2 MiB hugepages (HugePages_Free={free_pages()}); "
    f"reserve with 'sysctl -w vm.nr_hugepages={POOL_PAGES}'",
)


@needs_hugepages
def test_pool_on_hugepages_round_trip() -> None:
    before = free_pages()
    pool = MemoryPool(config(POOL_PAGES), SPEC, hugepages_without_cuda=True)
    try:
        assert pool.hugepages
        assert free_pages() <= before - POOL_PAGES, "pages are taken at start (MAP_POPULATE)"
        buffer = pool.allocate(16)
        assert buffer is not None
        kv = random_kv(16)
        buffer.kv().copy_(kv)
        assert torch.equal(buffer.kv(), kv)
    finally:
        pool.close()


def test_shortfall_is_a_config_error_with_the_fix() -> None:
    too_many = free_pages() + 1000
    with pytest.raises(ConfigError) as err:
        MemoryPool(config(too_many), SPEC, hugepages_without_cuda=True)
    text = str(err.value)
    assert f"needs {too_many} free 2 MiB hugepages" in text
    assert "HugePages_Free" in text and "sysctl -w vm.nr_hugepages=" in text


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: hugepages are used only on CUDA platforms (the seed's fallback rule)",
)
@needs_hugepages
def test_engine_pool_on_hugepages_is_cuda_registered() -> None:
    with LMCacheEngine(config(POOL_PAGES), SPEC, "huge") as engine:
        pool = engine.storage.pool
        assert pool.hugepages and pool.pinned
        kv = random_kv(32).cuda()
        engine.store(tokens(32), kv.cpu())
        with engine.retrieve_chunks(tokens(32)) as views:
            on_gpu = torch.cat([v.cuda(non_blocking=True) for _, v in views], dim=2)
        torch.cuda.synchronize()
        assert torch.equal(on_gpu, kv)
