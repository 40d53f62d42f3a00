"""Worker-side transfer in each of vLLM's paged layouts: store, evict from the paged cache,
load back, and compare slot for slot. CPU tensors always; CUDA tensors on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from lmcache import LMCacheEngine, LMCacheEngineConfig
from lmcache.integration.vllm.paged import (
    STAGING_BYTES,
    ChunkJob,
    Issued,
    PagedKVCache,
    PagedLayout,
    PagedTransfer,
    detect_layout,
    store_jobs,
)
from tests.vllm.conftest import BLOCK, DEVICES, NO_CUDA, SlotIO, make_paged

NUM_BLOCKS = 64
CHUNK = 32
LAYOUTS = [
    pytest.param(PagedLayout.KV_FIRST, False, id="kv-first"),
    pytest.param(PagedLayout.BLOCK_FIRST, False, id="block-first-NHD"),
    pytest.param(PagedLayout.BLOCK_FIRST, True, id="block-first-HND"),
    pytest.param(PagedLayout.MLA, False, id="mla"),
]


def slot_of(paged: torch.Tensor, layout: PagedLayout, slot: int) -> torch.Tensor:
    return SlotIO(layout).get(paged, torch.tensor([slot]))[0]


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


def settle(issued: Issued | None) -> None:
    """Wait for a transfer, and for the compute stream a load made wait on it (a test's
    stand-in for vLLM's forward pass reading the KV)."""
    if issued is not None:
        issued.done.synchronize()
        assert issued.landed() and issued.seconds() > 0
        torch.cuda.current_stream().synchronize()


def store(
    engine: LMCacheEngine, transfer: PagedTransfer, tokens: list[int], slots: torch.Tensor
) -> int:
    """The worker's store: reserve the new chunks, copy them all in one batch, publish once
    the copies have landed."""
    reserved = engine.reserve_chunks(tokens)
    settle(transfer.store(store_jobs(reserved, slots)))
    return engine.commit_chunks(reserved)


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
                jobs.append(ChunkJob(kv, lo - chunk.start, hi - chunk.start, slots[lo:hi]))
        done = transfer.start_load(jobs, layerwise)
        for layer in range(len(transfer.cache.layers)):
            transfer.wait_layer(layer)
        settle(done)


@pytest.mark.parametrize("staging", [STAGING_BYTES, 1], ids=["batched", "chunk-per-batch"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["chunk-major", "layer-major"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("layout", "hnd"), LAYOUTS)
def test_store_evict_load_restores_every_slot(
    layout: PagedLayout, hnd: bool, device: str, layerwise: bool, staging: int
) -> None:
    layers = make_layers(layout, device, hnd)
    before = [layer.clone() for layer in layers]
    cache = PagedKVCache(layers)
    assert cache.layout is layout
    transfer = PagedTransfer(cache, staging)
    tokens = list(range(1000, 1150))
    slots = random_slots(len(tokens))
    with make_engine(cache) as engine:
        assert store(engine, transfer, tokens, slots) == 150
        for layer in layers:
            layer.zero_()  # evicted from the GPU
        load(engine, transfer, tokens, slots, 0, 150, layerwise)

    for layer, original in zip(layers, before, strict=True):
        for slot in slots.tolist():
            assert torch.equal(slot_of(layer, layout, slot), slot_of(original, layout, slot))
        untouched = torch.ones(NUM_BLOCKS * BLOCK, dtype=torch.bool)
        untouched[slots] = False
        for slot in untouched.nonzero().flatten().tolist()[:50]:
            assert not slot_of(layer, layout, slot).any()


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
            got = slot_of(layer, layout, slot)
            if 40 <= position < 99:
                assert torch.equal(got, slot_of(original, layout, slot)), position
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_transfers_queued_behind_a_busy_gpu_keep_their_slot_ids() -> None:
    """Stores issued while the GPU is still busy (as vLLM's CPU runs ahead of its forward
    passes) queue their slot-id uploads and gathers behind it, four transfers deep: each must
    still copy its own slots (no host buffer refilled, no staging reused, before its turn)."""
    layout = PagedLayout.BLOCK_FIRST
    layers = make_layers(layout, "cuda", hnd=False, seed=5)
    before = [layer.clone() for layer in layers]
    transfer = PagedTransfer(PagedKVCache(layers))
    prompts = [list(range(base, base + 64)) for base in (10_000, 20_000, 30_000, 40_000)]
    slots = random_slots(len(prompts) * 64, seed=9).view(len(prompts), 64)
    with make_engine(transfer.cache) as engine:
        torch.cuda._sleep(200_000_000)  # the compute stream busy for ~0.1 s
        queued = []
        for tokens, prompt_slots in zip(prompts, slots, strict=True):
            reserved = engine.reserve_chunks(tokens)
            queued.append((reserved, transfer.store(store_jobs(reserved, prompt_slots))))
        for reserved, done in queued:
            settle(done)
            assert engine.commit_chunks(reserved) == 64
        for layer in layers:
            layer.zero_()
        for tokens, prompt_slots in zip(prompts, slots, strict=True):
            load(engine, transfer, tokens, prompt_slots, 0, 64, layerwise=False)

    for layer, original in zip(layers, before, strict=True):
        for slot in slots.flatten().tolist():
            assert torch.equal(slot_of(layer, layout, slot), slot_of(original, layout, slot))


@pytest.mark.parametrize("layerwise", [False, True], ids=["chunk-major", "layer-major"])
@pytest.mark.parametrize("device", DEVICES)
def test_one_batch_serves_several_requests_and_ranges(device: str, layerwise: bool) -> None:
    """Two requests stored in one call, then loaded in one call with full, partial-start and
    partial-end pieces mixed (the worker's per-step batch): every slot lands where it belongs."""
    layout = PagedLayout.KV_FIRST
    layers = make_layers(layout, device, hnd=False)
    before = [layer.clone() for layer in layers]
    transfer = PagedTransfer(PagedKVCache(layers))
    perm = random_slots(NUM_BLOCKS * BLOCK, seed=5)
    requests = [(list(range(100, 200)), perm[:100]), (list(range(900, 970)), perm[100:170])]
    with make_engine(transfer.cache) as engine:
        reserved = [engine.reserve_chunks(tokens) for tokens, _ in requests]
        settle(
            transfer.store(
                [
                    job
                    for (_, slots), chunks in zip(requests, reserved, strict=True)
                    for job in store_jobs(chunks, slots)
                ]
            )
        )
        assert [engine.commit_chunks(r) for r in reserved] == [100, 70]
        for layer in layers:
            layer.zero_()
        ranges = [(5, 100), (0, 61)]
        with (
            engine.retrieve_chunks(requests[0][0]) as first,
            engine.retrieve_chunks(requests[1][0]) as second,
        ):
            jobs = []
            for views, (start, end), (_, slots) in zip(
                (first, second), ranges, requests, strict=True
            ):
                for chunk, kv in views:
                    lo, hi = max(chunk.start, start), min(chunk.end, end)
                    if lo < hi:
                        jobs.append(ChunkJob(kv, lo - chunk.start, hi - chunk.start, slots[lo:hi]))
            settle(transfer.start_load(jobs, layerwise))

    for layer, original in zip(layers, before, strict=True):
        for (_, slots), (start, end) in zip(requests, ranges, strict=True):
            for position, slot in enumerate(slots.tolist()):
                got = slot_of(layer, layout, slot)
                if start <= position < end:
                    assert torch.equal(got, slot_of(original, layout, slot)), position
                else:
                    assert not got.any(), position


class CountingCache(PagedKVCache):
    """Counts per-layer gathers and scatters: each is one indexing kernel on the GPU."""

    reads = writes = 0

    def read(self, layer: int, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        self.reads += 1
        return super().read(layer, index)

    def write(self, layer: int, index: tuple[torch.Tensor, torch.Tensor], kv: torch.Tensor) -> None:
        self.writes += 1
        super().write(layer, index, kv)


@pytest.mark.parametrize("layerwise", [False, True], ids=["chunk-major", "layer-major"])
def test_equal_chunks_share_one_kernel_per_layer(layerwise: bool) -> None:
    """150 tokens = four full chunks + one of 22: two batches, so two gathers per layer for
    the store and two scatters per layer for the load, not one per chunk."""
    cache = CountingCache(make_layers(PagedLayout.BLOCK_FIRST, "cpu", hnd=False))
    num_layers = len(cache.layers)
    transfer = PagedTransfer(cache)
    tokens = list(range(3000, 3150))
    slots = random_slots(len(tokens), seed=7)
    with make_engine(cache) as engine:
        store(engine, transfer, tokens, slots)
        assert cache.reads == 2 * num_layers
        load(engine, transfer, tokens, slots, 0, 150, layerwise)
        assert cache.writes == 2 * num_layers


def test_triton_slot_copier_matches_plain_indexing() -> None:
    """The CUDA path's one-launch kernel, run by Triton's interpreter on CPU tensors (no GPU
    here; the GPU machine runs it for real through the CUDA tests above)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "tests.vllm.kernel_check"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
