from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lmcache import LMCacheEngine, LMCacheEngineConfig
from lmcache.storage.disk import SUFFIX, DiskBackend
from lmcache.storage.serde import FIXED_SIZE, MAX_TAG
from tests.engine.conftest import (
    CHUNK,
    CHUNK_BYTES,
    SPEC,
    EngineFactory,
    pool_gb,
    random_kv,
    tokens,
)

GB = 1 << 30


def disk_config(path: Path, chunks: int = 64) -> dict[str, object]:
    return {"local_disk": str(path), "max_local_disk_size": chunks * (CHUNK_BYTES + 256) / GB}


def disk_of(engine: object) -> DiskBackend:
    tier = engine.storage.lower[0]  # type: ignore[attr-defined]
    assert isinstance(tier, DiskBackend)
    return tier


def persist(make_engine: EngineFactory, tmp_path: Path, kv: torch.Tensor) -> LMCacheEngine:
    """Store ``kv`` for the first tokens through an engine with a disk tier, wait until it is on
    disk, and close that engine (as before a restart); returns it for its keys and paths."""
    writer = make_engine(**disk_config(tmp_path))
    writer.store(tokens(kv.shape[2]), kv)
    assert writer.flush(timeout=30)
    writer.close()
    return writer


def chunk_files(path: Path) -> list[Path]:
    return sorted(path.rglob("*" + SUFFIX))


def test_cache_survives_restart(make_engine: EngineFactory, tmp_path: Path) -> None:
    kv = random_kv(64)
    persist(make_engine, tmp_path, kv)
    assert len(chunk_files(tmp_path)) == 4

    second = make_engine(**disk_config(tmp_path))
    assert second.lookup(tokens(64)) == 64
    n, out = second.retrieve(tokens(64))
    assert n == 64 and torch.equal(out, kv)
    assert second.metrics.value("lmcache_tier_hit_chunks_total", tier="disk") == 4
    assert second.storage.cpu_prefix([c.key for c in second.chunks(tokens(64))]) == 4, (
        "disk hits are promoted to the CPU hot cache"
    )


def test_file_url_form(make_engine: EngineFactory, tmp_path: Path) -> None:
    engine = make_engine(local_disk=f"file://{tmp_path}/", max_local_disk_size=0.01)
    engine.store(tokens(16), random_kv(16))
    assert engine.flush(timeout=30) and len(chunk_files(tmp_path)) == 1


@pytest.mark.parametrize("damage", ["flip_payload", "truncate", "bad_magic", "swap_files"])
def test_corrupt_file_is_a_miss_and_removed(
    make_engine: EngineFactory, tmp_path: Path, damage: str
) -> None:
    kv = random_kv(32)
    writer = persist(make_engine, tmp_path, kv)
    first, second = (disk_of(writer).path_of(c.key) for c in writer.scheme.chunks(tokens(32), True))
    data = bytearray(second.read_bytes())
    if damage == "flip_payload":
        data[-100] ^= 0xFF
        second.write_bytes(data)
    elif damage == "truncate":
        second.write_bytes(data[: len(data) // 2])
    elif damage == "bad_magic":
        second.write_bytes(b"XXXX" + data[4:])
    else:  # a valid file under another chunk's name
        second.write_bytes(first.read_bytes())

    reader = make_engine(**disk_config(tmp_path))
    n, out = reader.retrieve(tokens(32))
    assert n == 16, "only the intact first chunk loads"
    assert torch.equal(out, kv[:, :, :16])
    assert not second.exists(), "a corrupt file is deleted"
    assert reader.metrics.value("lmcache_corrupt_values_total", tier="disk") == 1


def test_corrupted_after_indexing(make_engine: EngineFactory, tmp_path: Path) -> None:
    engine = make_engine(local_cpu=False, **disk_config(tmp_path))
    kv = random_kv(16)
    engine.store(tokens(16), kv)
    assert engine.flush(timeout=30)
    (path,) = chunk_files(tmp_path)
    data = bytearray(path.read_bytes())
    data[FIXED_SIZE + 10] ^= 0x01  # inside the key
    path.write_bytes(data)
    assert engine.lookup(tokens(16)) == 16, "the index still lists it"
    assert engine.retrieve(tokens(16))[0] == 0, "but the bytes are refused"
    assert engine.lookup(tokens(16)) == 0


def test_disk_lru_bound(make_engine: EngineFactory, tmp_path: Path) -> None:
    engine = make_engine(**disk_config(tmp_path, chunks=3))
    for i in range(5):
        engine.store(tokens(16, 1000 * i), random_kv(16, i))
        assert engine.flush(timeout=30)
    assert len(chunk_files(tmp_path)) == 3
    assert disk_of(engine).used_bytes <= engine.config.max_local_disk_bytes
    assert engine.metrics.value("lmcache_disk_evictions_total") == 2


def test_staging_only_pool_with_disk(make_engine: EngineFactory, tmp_path: Path) -> None:
    """local_cpu: false still uses the pool as the staging buffer for the disk tier."""
    engine = make_engine(local_cpu=False, **disk_config(tmp_path))
    kv = random_kv(48)
    assert engine.store(tokens(48), kv) == 48
    assert engine.flush(timeout=30)
    assert engine.storage.pool.free_slots == engine.storage.pool.num_slots
    n, out = engine.retrieve(tokens(48))
    assert n == 48 and torch.equal(out, kv)
    assert engine.storage.pool.free_slots == engine.storage.pool.num_slots
    assert engine.store(tokens(48), kv) == 0, "already on disk"


def test_full_disk_is_a_counted_miss(make_engine: EngineFactory, tmp_path: Path) -> None:
    """A real ENOSPC from the kernel: the temp file is a symlink to /dev/full."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full to produce ENOSPC")
    engine = make_engine(local_cpu=False, **disk_config(tmp_path))
    (chunk,) = engine.chunks(tokens(16))
    target = disk_of(engine).path_of(chunk.key)
    os.symlink("/dev/full", target.with_name(target.name + ".tmp"))
    assert engine.store(tokens(16), random_kv(16)) == 16
    assert engine.flush(timeout=30)
    assert engine.metrics.value("lmcache_tier_errors_total", tier="disk", op="write") == 1
    assert engine.lookup(tokens(16)) == 0
    assert engine.storage.pool.free_slots == engine.storage.pool.num_slots


def test_prefetch_warms_cpu_from_disk(make_engine: EngineFactory, tmp_path: Path) -> None:
    kv = random_kv(64)
    persist(make_engine, tmp_path, kv)
    engine = make_engine(**disk_config(tmp_path))
    keys = [c.key for c in engine.chunks(tokens(64))]
    assert engine.storage.cpu_prefix(keys) == 0
    handle = engine.prefetch(tokens(64))
    assert handle.wait(timeout=30) == 64
    assert engine.storage.cpu_prefix(keys) == 4
    assert torch.equal(engine.retrieve(tokens(64))[1], kv)


def test_lookup_triggers_prefetch_when_enabled(make_engine: EngineFactory, tmp_path: Path) -> None:
    persist(make_engine, tmp_path, random_kv(32))
    engine = make_engine(prefetch=True, **disk_config(tmp_path))
    assert engine.lookup(tokens(32)) == 32
    engine._prefetcher.shutdown(wait=True)  # drain the background load started by lookup
    keys = [c.key for c in engine.chunks(tokens(32))]
    assert engine.storage.cpu_prefix(keys) == 2


def test_tp_ranks_share_a_volume_without_touching_each_other(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Every TP rank of a pod runs its own engine on the same local_disk: each keeps to its own
    folder, so a restart never indexes (and a small budget never evicts) another rank's files."""
    ranks = [make_engine(rank=r, world_size=2, **disk_config(tmp_path, chunks=2)) for r in (0, 1)]
    for rank, engine in enumerate(ranks):
        engine.store(tokens(32), random_kv(32, seed=rank))
        assert engine.flush(timeout=30)
        engine.close()
    restarted = make_engine(rank=0, world_size=2, **disk_config(tmp_path, chunks=1))
    assert disk_of(restarted).used_bytes <= restarted.config.max_local_disk_bytes
    rank1_files = chunk_files(tmp_path / disk_of(ranks[1]).directory.name)
    assert len(rank1_files) == 2, "rank 0's eviction left rank 1's files alone"


def test_another_chunk_size_never_loads_foreign_chunks(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    kv = random_kv(33)
    persist(make_engine, tmp_path, kv)  # chunk 16: stores [0:16) [16:32) [32:33)
    reader = make_engine(chunk_size=32, **disk_config(tmp_path))
    n, out = reader.retrieve(tokens(33))
    assert n == 0 and out.shape[2] == 0


class _LongTags:
    """A listener whose tags outgrow a file header (a huge chunk's block hashes)."""

    def __init__(self) -> None:
        self.disk_tags: list[bytes] = []

    def landed(self, key: str, tier: str, tag: bytes = b"") -> None:
        if tier == "disk":
            self.disk_tags.append(tag)

    def left(self, key: str, tier: str) -> None:
        pass

    def tag(self, key: str) -> bytes:
        return b"x" * (MAX_TAG + 1)

    def settled(self, key: str) -> None:
        pass


def test_a_tag_too_long_for_a_header_is_left_out(tmp_path: Path) -> None:
    """The chunk is still written and read back after a restart; only its tag is dropped."""
    config = LMCacheEngineConfig.from_mapping(
        {"chunk_size": CHUNK, "max_local_cpu_size": pool_gb(64), **disk_config(tmp_path)}
    )
    kv = random_kv(64)
    with LMCacheEngine(config, SPEC, model_name="test-model", listener=_LongTags()) as writer:
        writer.store(tokens(64), kv)
        assert writer.flush(timeout=30)
    listener = _LongTags()
    with LMCacheEngine(config, SPEC, model_name="test-model", listener=listener) as reader:
        n, out = reader.retrieve(tokens(64))
    assert n == 64 and torch.equal(out, kv)
    assert listener.disk_tags == [b""] * 4, "re-announced at start-up, without the tag"
