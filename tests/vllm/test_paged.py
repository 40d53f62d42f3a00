"""Worker-side transfer in each of vLLM's paged layouts: store, evict from the paged cache,
load back, and compare slot for slot. CPU tensors always; CUDA tensors on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from lmcache import LMCacheEngine, LMCacheEngineConfig
from lmcache.integration.vllm.paged import (
    LoadJob,
    PagedKVCache,
    PagedLayout,
    PagedTransfer,
    detect_layout,
)
from tests.vllm.conftest import BLOCK, DEVICES, make_paged, token_slice

NUM_BLOCKS = 64
CHUNK = 32
LAYOUTS = [
    pytest.param(PagedLayout.KV_FIRST, False, id="kv-first"),
    pytest.param(PagedLayout.BLOCK_FIRST, False, id="block-first-NHD"),
    pytest.param(PagedLayout.BLOCK_FIRST, True, id="block-first-HND"),
    pytest.param(PagedLayout.MLA, False, id="mla"),
]


def make_layers(layout: PagedLayout, device: str, hnd: bool, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(3):
        layer = make_paged(layout, NUM_BLOCKS, device, hnd)
        layer.copy_(torch.randn(layer.shape, generator=gen).to(device))
        layers.append(layer)
    return layers


def random_slots(n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(NUM_BLOCKS * BLOCK, generator=gen)[:n]


def make_engine(cache: PagedKVCache) -> LMCacheEngine:
    config = LMCacheEngineConfig.from_mapping({"chunk_size": CHUNK, "max_local_cpu_size": 0.01})
    return LMCacheEngine(config, cache.spec, "paged-test")


def store(
    engine: LMCacheEngine, transfer: PagedTransfer, tokens: list[int], slots: torch.Tensor
) -> int:
    transfer.begin_store()
    return engine.store_chunks(
        tokens, lambda chunk, dst: transfer.gather(slots[chunk.start : chunk.end], dst)
    )


def load(
    engine: LMCacheEngine,
    transfer: PagedTransfer,
    tokens: list[int],
    slots: torch.Tensor,
    start: int,
    end: int,
    layerwise: bool = True,
) -> None:
    """Load tokens ``[start, end)`` of the cached prefix into their slots."""
    with engine.retrieve_chunks(tokens) as views:
        jobs = []
        for chunk, kv in views:
            lo, hi = max(chunk.start, start), min(chunk.end, end)
            if lo < hi:
                jobs.append(LoadJob(kv, lo - chunk.start, hi - chunk.start, slots[lo:hi]))
        transfer.start_load(jobs, layerwise)
        for layer in range(len(transfer.cache.layers)):
            transfer.wait_layer(layer)
        transfer.finish_load()


@pytest.mark.parametrize("layerwise", [False, True], ids=["chunk-major", "layer-major"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("layout", "hnd"), LAYOUTS)
def test_store_evict_load_restores_every_slot(
    layout: PagedLayout, hnd: bool, device: str, layerwise: bool
) -> None:
    layers = make_layers(layout, device, hnd)
    before = [layer.clone() for layer in layers]
    cache = PagedKVCache(layers)
    assert cache.layout is layout
    transfer = PagedTransfer(cache)
    tokens = list(range(1000, 1150))
    slots = random_slots(len(tokens))
    with make_engine(cache) as engine:
        assert store(engine, transfer, tokens, slots) == 150
        for layer in layers:
            layer.zero_()  # evicted from the GPU
        load(engine, transfer, tokens, slots, 0, 150, layerwise)

    for layer, original in zip(layers, before, strict=True):
        for slot in slots.tolist():
            assert torch.equal(
                token_slice(layer, layout, slot), token_slice(original, layout, slot)
            )
        untouched = torch.ones(NUM_BLOCKS * BLOCK, dtype=torch.bool)
        untouched[slots] = False
        for slot in untouched.nonzero().flatten().tolist()[:50]:
            assert not token_slice(layer, layout, slot).any()


@pytest.mark.parametrize("layerwise", [False, True], ids=["chunk-major", "layer-major"])
@pytest.mark.parametrize("device", DEVICES)
def test_partial_load_writes_only_its_range(device: str, layerwise: bool) -> None:
    layout = PagedLayout.BLOCK_FIRST
    layers = make_layers(layout, device, hnd=False)
    before = [layer.clone() for layer in layers]
    transfer = PagedTransfer(PagedKVCache(layers))
    tokens = list(range(500, 600))
    slots = random_slots(len(tokens), seed=3)
    with make_engine(transfer.cache) as engine:
        store(engine, transfer, tokens, slots)
        for layer in layers:
            layer.zero_()
        load(engine, transfer, tokens, slots, 40, 99, layerwise)  # mid-chunk start and end

    for layer, original in zip(layers, before, strict=True):
        for position, slot in enumerate(slots.tolist()):
            got = token_slice(layer, layout, slot)
            if 40 <= position < 99:
                assert torch.equal(got, token_slice(original, layout, slot)), position
            else:
                assert not got.any(), position


def test_spec_follows_the_registered_tensors() -> None:
    cache = PagedKVCache(make_layers(PagedLayout.KV_FIRST, "cpu", hnd=False))
    assert (cache.spec.num_layers, cache.spec.kv_factor, cache.block_size) == (3, 2, BLOCK)
    mla = PagedKVCache(make_layers(PagedLayout.MLA, "cpu", hnd=False))
    assert (mla.spec.kv_factor, mla.spec.num_kv_heads) == (1, 1)


def test_unsupported_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unsupported paged KV cache shape \(2, 2, 16, 2, 8\)"):
        detect_layout((2, 2, 16, 2, 8))
    with pytest.raises(ValueError, match="allowed"):
        detect_layout((4, 16))
    mixed = [torch.zeros(4, 2, BLOCK, 2, 8), torch.zeros(4, 2, BLOCK, 2, 4)]
    with pytest.raises(ValueError, match="layers differ"):
        PagedKVCache(mixed)
