"""The worker's per-step store: every request's new chunks copied in one batch, then
published; a chunk two requests of one step share is stored once; a failed copy publishes
nothing and leaks no pool slot."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from lmcache.integration.vllm.metadata import LMCacheConnectorMetadata, RequestOp
from lmcache.integration.vllm.paged import ChunkJob, PagedTransfer
from lmcache.integration.vllm.worker import WorkerConnector
from tests.vllm.conftest import CHUNK, Rig, RigFactory
from tests.vllm.test_scheduler import prompt, store_line


def worker_of(rig: Rig) -> WorkerConnector:
    worker = rig.worker._lmcache_engine.worker  # type: ignore[attr-defined]
    assert isinstance(worker, WorkerConnector)
    return worker


def fill_layers(rig: Rig) -> None:
    gen = torch.Generator().manual_seed(0)
    for paged in rig.layers.values():
        paged.copy_(torch.randn(paged.shape, generator=gen))


def two_requests(tokens: list[int]) -> LMCacheConnectorMetadata:
    """Two requests with the same prompt in different blocks, both storing it this step
    (as with vLLM's prefix caching off)."""
    blocks = len(tokens) // 16
    return LMCacheConnectorMetadata(
        [
            RequestOp("a", tokens, list(range(1, 1 + blocks)), store_end=len(tokens)),
            RequestOp("b", tokens, list(range(50, 50 + blocks)), store_end=len(tokens)),
        ]
    )


def test_shared_chunks_of_one_step_are_copied_once(
    rig_factory: RigFactory, lmcache_log: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = rig_factory()
    fill_layers(rig)
    worker = worker_of(rig)
    engine = worker.engine
    copied: list[int] = []
    real_store = PagedTransfer.store

    def counting_store(self: PagedTransfer, jobs: Sequence[ChunkJob]) -> None:
        copied.append(len(jobs))
        real_store(self, jobs)

    monkeypatch.setattr(PagedTransfer, "store", counting_store)
    tokens = prompt(2 * CHUNK)
    meta = two_requests(tokens)
    worker.wait_for_save(meta)

    assert copied == [2], "one batch per step, each shared chunk copied once"

    assert store_line("a", 2 * CHUNK, 2 * CHUNK) in lmcache_log
    assert store_line("b", 0, 2 * CHUNK) in lmcache_log
    pool = engine.storage.pool
    assert pool.num_slots - pool.free_slots == 2, "one slot per chunk, none reserved twice"
    n, kv = engine.retrieve(tokens)
    assert n == 2 * CHUNK
    slots = meta.requests[0].slots(16, n)
    for layer, paged in enumerate(rig.layers.values()):
        blocks, offsets = slots // 16, slots % 16
        assert torch.equal(kv[layer], paged[blocks, :, offsets].transpose(0, 1))


def test_failed_copy_publishes_nothing_and_frees_its_slots(
    rig_factory: RigFactory, lmcache_log: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = rig_factory()
    worker = worker_of(rig)
    engine = worker.engine
    free = engine.storage.pool.free_slots

    def broken(self: PagedTransfer, jobs: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    # A device fault cannot be provoked on CPU tensors: the copy is replaced to raise one.
    monkeypatch.setattr(PagedTransfer, "store", broken)
    tokens = prompt(2 * CHUNK, seed=3)
    worker.wait_for_save(two_requests(tokens))

    assert any("copy out of the paged cache failed" in m for m in lmcache_log)
    assert engine.storage.pool.free_slots == free
    assert engine.lookup(tokens) == 0
