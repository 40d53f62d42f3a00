"""Two-phase store (reserve, fill, commit or abort): the contract the GPU store path relies on
to copy many chunks asynchronously and publish them only once their bytes are complete."""

from __future__ import annotations

import logging
import random
import threading
from pathlib import Path

import pytest
import torch

from lmcache import KVSpec, LMCacheEngine, LMCacheEngineConfig
from lmcache.keys import ChunkRange
from lmcache.storage.manager import Reserved
from tests.engine.conftest import CHUNK_BYTES, GB, EngineFactory, pool_gb, random_kv, tokens


def fill_from(kv: torch.Tensor, reserved: Reserved) -> None:
    for chunk, buffer in reserved:
        buffer.kv().copy_(kv[:, :, chunk.start : chunk.end])


def test_reserved_chunks_are_invisible_until_commit(make_engine: EngineFactory) -> None:
    engine = make_engine()
    kv = random_kv(64)
    reserved = engine.reserve_chunks(tokens(64))
    assert [chunk.start for chunk, _ in reserved] == [0, 16, 32, 48]
    fill_from(kv, reserved)
    assert engine.lookup(tokens(64)) == 0
    assert engine.retrieve(tokens(64))[0] == 0
    assert len(engine.storage.cpu) == 0

    assert engine.commit_chunks(reserved) == 64
    n, out = engine.retrieve(tokens(64))
    assert n == 64 and torch.equal(out, kv)


def test_reserve_skips_stored_chunks_and_honours_skip_tokens(make_engine: EngineFactory) -> None:
    engine = make_engine()
    engine.store(tokens(32), random_kv(32))
    first = engine.reserve_chunks(tokens(80))
    assert [c.start for c, _ in first] == [32, 48, 64]
    assert engine.reserve_chunks(tokens(80)) == [], "chunks on their way are not stored twice"
    engine.abort_chunks(first)
    assert [c.start for c, _ in engine.reserve_chunks(tokens(80), skip_tokens=48)] == [48, 64]


def test_abort_returns_every_slot_and_publishes_nothing(make_engine: EngineFactory) -> None:
    engine = make_engine()
    pool = engine.storage.pool
    free = pool.free_slots
    reserved = engine.reserve_chunks(tokens(64))
    assert pool.free_slots == free - 4
    fill_from(random_kv(64), reserved)
    engine.abort_chunks(reserved)
    assert pool.free_slots == free
    assert engine.lookup(tokens(64)) == 0
    assert engine.store(tokens(64), random_kv(64)) == 64, "aborted chunks can be stored later"


def test_failing_fill_aborts_and_propagates(make_engine: EngineFactory) -> None:
    engine = make_engine()
    pool = engine.storage.pool
    free = pool.free_slots

    def fill(chunk: ChunkRange, dst: torch.Tensor) -> None:
        if chunk.start == 32:
            raise RuntimeError("copy failed")
        dst.zero_()

    with pytest.raises(RuntimeError, match="copy failed"):
        engine.store_chunks(tokens(64), fill)
    assert pool.free_slots == free
    assert engine.lookup(tokens(64)) == 0, "not even the chunks filled before the failure"


def test_reserved_slots_are_never_evicted(make_engine: EngineFactory) -> None:
    engine = make_engine(max_local_cpu_size=pool_gb(6))
    kv = random_kv(64, seed=1)
    reserved = engine.reserve_chunks(tokens(64))
    fill_from(kv, reserved)
    # Other prompts churn the two remaining slots; a reserved slot must not be taken.
    for offset in range(1000, 5000, 1000):
        assert engine.store(tokens(32, offset), random_kv(32, seed=offset)) == 32
    assert engine.store(tokens(48, 9000), random_kv(48)) == 32, "only two slots are not reserved"
    assert engine.commit_chunks(reserved) == 64
    n, out = engine.retrieve(tokens(64))
    assert n == 64 and torch.equal(out, kv)


def test_full_pool_reserves_a_prefix_and_counts_the_rest(make_engine: EngineFactory) -> None:
    engine = make_engine(max_local_cpu_size=pool_gb(3))
    held = engine.reserve_chunks(tokens(32))
    reserved = engine.reserve_chunks(tokens(64, 500))
    assert [c.start for c, _ in reserved] == [0], "one free slot: the first chunk only"
    assert engine.metrics.value("lmcache_skipped_stores_total") == 3
    engine.abort_chunks(held)
    engine.abort_chunks(reserved)
    assert engine.storage.pool.free_slots == 3


def test_no_write_through_before_commit(make_engine: EngineFactory, tmp_path: Path) -> None:
    engine = make_engine(
        local_disk=str(tmp_path), max_local_disk_size=64 * (CHUNK_BYTES + 256) / GB
    )
    disk = engine.storage.lower[0]
    keys = [c.key for c in engine.chunks(tokens(64))]
    reserved = engine.reserve_chunks(tokens(64))
    fill_from(random_kv(64), reserved)
    assert engine.flush(timeout=30)
    assert disk.contains_prefix(keys) == 0 and not list(tmp_path.rglob("*.kv"))
    engine.commit_chunks(reserved)
    assert engine.flush(timeout=30)
    assert disk.contains_prefix(keys) == 4


def test_commit_logs_the_store_line(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine()
    engine.store(tokens(16), random_kv(16))
    reserved = engine.reserve_chunks(tokens(40))
    fill_from(random_kv(40), reserved)
    with caplog.at_level(logging.INFO, logger="lmcache"):
        assert engine.commit_chunks(reserved, request_id="req-1", total_tokens=40) == 24
    lines = [r.getMessage() for r in caplog.records]
    assert "Storing KV cache for 24 out of 40 tokens for request req-1" in lines


def test_concurrent_two_phase_stores_under_eviction() -> None:
    """Threads reserve, fill, then commit or abort overlapping prefixes while the pool evicts
    constantly: every hit carries its own KV and no slot leaks."""
    spec = KVSpec(num_layers=1, num_kv_heads=1, head_size=4, dtype=torch.float32)
    chunk = 4
    slots = 10
    config = LMCacheEngineConfig.from_mapping(
        {"chunk_size": chunk, "max_local_cpu_size": slots * chunk * spec.bytes_per_token / GB}
    )
    prompts = [[p * 1000 + t for t in range(6 * chunk)] for p in range(5)]
    errors: list[str] = []

    def kv_for(prompt: list[int]) -> torch.Tensor:
        ids = torch.tensor(prompt, dtype=torch.float32)
        return ids.view(1, 1, -1, 1, 1).expand(spec.shape(len(prompt))).contiguous()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            prompt = rng.choice(prompts)[: rng.randrange(chunk, 6 * chunk + 1)]
            if rng.random() < 0.6:
                reserved = engine.reserve_chunks(prompt)
                for c, buffer in reserved:
                    buffer.kv().copy_(kv_for(prompt)[:, :, c.start : c.end])
                if rng.random() < 0.8:
                    engine.commit_chunks(reserved)
                else:
                    engine.abort_chunks(reserved)
            else:
                n, out = engine.retrieve(prompt)
                if n and not torch.equal(out, kv_for(prompt)[:, :, :n]):
                    errors.append(f"wrong KV for prompt {prompt[0]} n={n}")

    with LMCacheEngine(config, spec, "two-phase") as engine:
        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        pool = engine.storage.pool
        assert pool.free_slots + len(engine.storage.cpu) == pool.num_slots, "no leaked slots"
        assert len(engine.storage.cpu) > 0
    assert not errors, errors[:5]
