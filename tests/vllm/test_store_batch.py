"""The worker's per-step store: every request's new chunks copied in one batch, then
published; a chunk two requests of one step share is stored once; a failed copy publishes
nothing and leaks no pool slot."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from lmcache.integration.vllm.metadata import BlockSpan, LMCacheConnectorMetadata, StoreSpec
from lmcache.integration.vllm.paged import ChunkJob, PagedTransfer
from lmcache.keys import chunk_digests
from tests.vllm.conftest import BLOCK, CHUNK, Rig, RigFactory
from tests.vllm.test_scheduler import prompt, store_line


def fill_layers(rig: Rig) -> None:
    gen = torch.Generator().manual_seed(0)
    for paged in rig.layers.values():
        paged.copy_(torch.randn(paged.shape, generator=gen))


def two_requests(tokens: list[int]) -> LMCacheConnectorMetadata:
    """Two requests with the same prompt in different blocks, both storing it this step
    (as with vLLM's prefix caching off)."""
    chunks = tuple(chunk_digests(tokens, CHUNK, include_partial=True))
    blocks = len(tokens) // BLOCK
    return LMCacheConnectorMetadata(
        stores=[
            StoreSpec("a", chunks, BlockSpan(0, tuple(range(1, 1 + blocks))), len(tokens)),
            StoreSpec("b", chunks, BlockSpan(0, tuple(range(50, 50 + blocks))), len(tokens)),
        ]
    )


def test_shared_chunks_of_one_step_are_copied_once(
    rig_factory: RigFactory, lmcache_log: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = rig_factory()
    fill_layers(rig)
    engine = rig.engine
    copied: list[int] = []
    real_store = PagedTransfer.store

    def counting_store(self: PagedTransfer, jobs: Sequence[ChunkJob]) -> object:
        copied.append(len(jobs))
        return real_store(self, jobs)

    monkeypatch.setattr(PagedTransfer, "store", counting_store)
    tokens = prompt(2 * CHUNK)
    meta = two_requests(tokens)
    rig.connector.wait_for_save(meta)

    assert copied == [2], "one batch per step, each shared chunk copied once"
    assert store_line("a", 2 * CHUNK, 2 * CHUNK) in lmcache_log
    assert store_line("b", 0, 2 * CHUNK) in lmcache_log
    pool = engine.storage.pool
    assert pool.num_slots - pool.free_slots == 2, "one slot per chunk, none reserved twice"
    n, kv = engine.retrieve(tokens)
    assert n == 2 * CHUNK
    slots = meta.stores[0].blocks.slots(BLOCK, 0, n)
    for layer, paged in enumerate(rig.layers.values()):
        blocks, offsets = slots // BLOCK, slots % BLOCK
        assert torch.equal(kv[layer], paged[blocks, :, offsets].transpose(0, 1))


def test_failed_copy_publishes_nothing_and_frees_its_slots(
    rig_factory: RigFactory, lmcache_log: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = rig_factory()
    engine = rig.engine
    free = engine.storage.pool.free_slots

    def broken(self: PagedTransfer, jobs: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    # A device fault cannot be provoked on CPU tensors: the copy is replaced to raise one.
    monkeypatch.setattr(PagedTransfer, "store", broken)
    tokens = prompt(2 * CHUNK, seed=3)
    rig.connector.wait_for_save(two_requests(tokens))

    assert any("copy out of the paged cache failed" in m for m in lmcache_log)
    assert engine.storage.pool.free_slots == free
    assert engine.lookup(tokens) == 0
    assert rig.connector.get_finished({"a", "b"}) == ({"a", "b"}, None), (
        "vLLM may free the blocks of requests whose stores were dropped"
    )
