"""Many threads storing, looking up, retrieving and prefetching overlapping prefixes through a
pool small enough to evict constantly: every retrieved token must carry its own KV."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from lmcache import KVSpec, LMCacheEngine, LMCacheEngineConfig, PrefetchHandle
from lmcache.memory.pool import ChunkBuffer
from lmcache.storage.backend import StorageBackend, WriteDone

SPEC = KVSpec(num_layers=2, num_kv_heads=1, head_size=8, dtype=torch.float32)
CHUNK = 8


def kv_for(prompt: list[int]) -> torch.Tensor:
    """KV whose every element at position t is the token id: checkable after any reshuffle."""
    ids = torch.tensor(prompt, dtype=torch.float32)
    return ids.view(1, 1, -1, 1, 1).expand(SPEC.shape(len(prompt))).contiguous()


def test_threads_never_see_wrong_kv(tmp_path: Path) -> None:
    slots = 12
    config = LMCacheEngineConfig.from_mapping(
        {
            "chunk_size": CHUNK,
            "max_local_cpu_size": slots * CHUNK * SPEC.bytes_per_token / (1 << 30),
            "local_disk": str(tmp_path),
            "max_local_disk_size": 0.001,
        }
    )
    prompts = [[p * 1000 + t for t in range(8 * CHUNK)] for p in range(6)]
    errors: list[str] = []
    prefetches: list[PrefetchHandle] = []
    hits = 0
    hits_lock = threading.Lock()

    def worker(seed: int) -> None:
        nonlocal hits
        rng = random.Random(seed)
        for _ in range(300):
            prompt = rng.choice(prompts)[: rng.randrange(CHUNK, 8 * CHUNK + 1)]
            action = rng.random()
            if action < 0.4:
                engine.store(prompt, kv_for(prompt))
            elif action < 0.5:
                with hits_lock:
                    prefetches.append(engine.prefetch(prompt))
            else:
                engine.lookup(prompt)
                n, out = engine.retrieve(prompt)
                if n and not torch.equal(out, kv_for(prompt)[:, :, :n]):
                    errors.append(f"wrong KV for prompt starting {prompt[0]} n={n}")
                with hits_lock:
                    hits += n > 0

    with LMCacheEngine(config, SPEC, "concurrent") as engine:
        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for handle in prefetches:
            handle.wait(timeout=60)
        assert engine.flush(timeout=60)
        pool = engine.storage.pool
        assert pool.free_slots + len(engine.storage.cpu) == pool.num_slots, "no leaked slots"
    assert not errors, errors[:5]
    assert hits > 0


class HoldingTier(StorageBackend):
    """A lower tier that keeps every submitted write pending: it records how many references
    the buffer carried when the tier first saw it."""

    name = "holding"

    def __init__(self) -> None:
        self.refs_at_submit: list[int] = []
        self.pending: list[WriteDone] = []

    def contains_prefix(self, keys: Sequence[str]) -> int:
        return 0

    def load_prefix(self, keys: Sequence[str], buffers: Sequence[ChunkBuffer]) -> int:
        return 0

    def submit(self, key: str, buffer: ChunkBuffer, done: WriteDone) -> None:
        self.refs_at_submit.append(buffer.refs)
        self.pending.append(done)

    def close(self) -> None:
        for done in self.pending:
            done()


def test_write_back_references_are_taken_when_published() -> None:
    """Once a chunk is in the CPU index another thread may evict it; if its write-back
    reference were taken after that, the slot could be reused and another chunk's bytes
    written under this key. So the first tier must already see every tier's reference."""
    tiers = [HoldingTier(), HoldingTier()]
    config = LMCacheEngineConfig.from_mapping(
        {"chunk_size": CHUNK, "max_local_cpu_size": 4 * CHUNK * SPEC.bytes_per_token / (1 << 30)}
    )
    with LMCacheEngine(config, SPEC, "refs", lower_tiers=tiers) as engine:
        prompt = list(range(CHUNK))
        engine.store(prompt, kv_for(prompt))
        assert tiers[0].refs_at_submit == [3], "index + one reference per lower tier"
