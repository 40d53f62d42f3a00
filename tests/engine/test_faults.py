"""Every failure of a tier is a miss and a metric: no leaked slot, no dead thread, no hang.

The disk faults are real: a tmpfs mounted read-only or too small, directories and FIFOs under
chunk names, files replaced behind the engine's back. Mounting needs root; without it those
tests are skipped with that reason.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from lmcache import LMCacheEngine
from lmcache.keys import KVContext
from lmcache.memory.pool import ChunkBuffer
from lmcache.storage import serde
from lmcache.storage.backend import StorageBackend, WriteDone
from lmcache.storage.disk import DiskBackend
from tests.engine.conftest import CHUNK, CHUNK_BYTES, GB, SPEC, EngineFactory, pool_gb, random_kv
from tests.engine.conftest import tokens as make_tokens


def no_leaked_slots(engine: LMCacheEngine) -> bool:
    """Every slot is free or held by the CPU index alone (nothing pinned, nothing in flight)."""
    storage = engine.storage
    return storage.pool.free_slots + len(storage.cpu) == storage.pool.num_slots and all(
        storage.cpu.get(key) is not None and storage.cpu.get(key).refs == 1  # type: ignore[union-attr]
        for key in storage.cpu.keys_lru_first()
    )


def disk_of(engine: LMCacheEngine) -> DiskBackend:
    tier = engine.storage.lower[0]
    assert isinstance(tier, DiskBackend)
    return tier


def disk_config(path: Path, chunks: int = 64) -> dict[str, object]:
    return {"local_disk": str(path), "max_local_disk_size": chunks * (CHUNK_BYTES + 256) / GB}


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: small enough to fill, and remountable read-only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("shard_exists", [True, False], ids=["folder-exists", "no-folder"])
def test_read_only_disk_keeps_the_cpu_cache_storing(
    make_engine: EngineFactory, tmpfs: Path, shard_exists: bool
) -> None:
    if shard_exists:  # the tier's own folder was made before the volume went read-only
        make_engine(**disk_config(tmpfs / "kv")).close()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    engine = make_engine(**disk_config(tmpfs / "kv"))
    for i in range(3):
        kv = random_kv(32, seed=i)
        assert engine.store(make_tokens(32, offset=1000 * i), kv) == 32
        assert engine.flush(timeout=30)
    disk = disk_of(engine)
    assert disk._writer.is_alive(), "the writer survives every failed write"
    assert engine.metrics.value("lmcache_tier_errors_total", tier="disk", op="write") >= 1
    assert engine.lookup(make_tokens(32, offset=2000)) == 32, "stores still land in CPU"
    assert no_leaked_slots(engine)


def test_full_disk_is_a_counted_miss(make_engine: EngineFactory, tmpfs: Path) -> None:
    chunks = (1 << 20) // CHUNK_BYTES + 8  # more than the 1 MiB tmpfs holds
    engine = make_engine(max_local_cpu_size=pool_gb(chunks), **disk_config(tmpfs, 4 * chunks))
    rounds = -(-chunks // 32)  # 32 chunks a round: under the writer's queue bound
    for i in range(rounds):
        ids = make_tokens(32 * CHUNK, offset=100_000 * i)
        assert engine.store(ids, random_kv(32 * CHUNK, seed=i)) == 32 * CHUNK
        assert engine.flush(timeout=60)
    assert engine.metrics.value("lmcache_tier_errors_total", tier="disk", op="write") >= 1
    assert disk_of(engine)._writer.is_alive()
    kv = random_kv(CHUNK, seed=99)
    assert engine.store(make_tokens(CHUNK, offset=1), kv) == CHUNK, "the CPU cache still stores"
    n, out = engine.retrieve(make_tokens(CHUNK, offset=1))
    assert n == CHUNK and torch.equal(out, kv)
    assert no_leaked_slots(engine)


def test_directories_fifos_and_links_named_like_chunks_do_not_stop_start_up(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    writer = make_engine(**disk_config(tmp_path))
    kv = random_kv(32)
    writer.store(make_tokens(32), kv)
    assert writer.flush(timeout=30)
    shard = disk_of(writer).directory
    writer.close()
    (shard / ("a" * 32 + ".kv")).mkdir()
    os.mkfifo(shard / ("b" * 32 + ".kv"))
    (shard / ("c" * 32 + ".kv")).symlink_to("/dev/zero")

    started: list[LMCacheEngine] = []
    thread = threading.Thread(target=lambda: started.append(make_engine(**disk_config(tmp_path))))
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "start-up hung on a FIFO"
    (reader,) = started
    assert reader.metrics.value("lmcache_corrupt_values_total", tier="disk") == 3
    n, out = reader.retrieve(make_tokens(32))
    assert n == 32 and torch.equal(out, kv), "the real chunk files still load"


def test_unreadable_file_leaves_the_index(make_engine: EngineFactory, tmp_path: Path) -> None:
    """A file that cannot be read must stop being promised by lookups."""
    writer = make_engine(**disk_config(tmp_path))
    writer.store(make_tokens(32), random_kv(32))
    assert writer.flush(timeout=30)
    writer.close()
    reader = make_engine(**disk_config(tmp_path))
    second = disk_of(reader).path_of(reader.chunks(make_tokens(32))[1].key)
    second.unlink()
    second.mkdir()  # replaced behind the engine's back by something no read can use
    assert reader.lookup(make_tokens(32)) == 32
    n, _ = reader.retrieve(make_tokens(32))
    assert n == CHUNK
    assert reader.lookup(make_tokens(32)) == CHUNK, "no longer promised"
    assert no_leaked_slots(reader)


def test_crafted_short_chunk_on_disk_is_refused(make_engine: EngineFactory, tmp_path: Path) -> None:
    """A self-consistent file holding 5 tokens under a full chunk's key is never loaded."""
    writer = make_engine(**disk_config(tmp_path))
    writer.store(make_tokens(32), random_kv(32))
    assert writer.flush(timeout=30)
    writer.close()
    reader = make_engine(**disk_config(tmp_path))
    key = reader.chunks(make_tokens(32))[0].key
    path = disk_of(reader).path_of(key)
    payload = memoryview(random_kv(5).view(torch.uint8).numpy().tobytes())
    path.write_bytes(serde.header_for(key, SPEC, 5, payload).encode() + bytes(payload))
    n, _ = reader.retrieve(make_tokens(32))
    assert n == 0
    assert reader.metrics.value("lmcache_corrupt_values_total", tier="disk") == 1
    assert no_leaked_slots(reader)


class RaisingTier(StorageBackend):
    """A tier that breaks its contract (raises): a bug must still be only a miss."""

    name = "broken"

    def __init__(self, fail: str) -> None:
        self.fail = fail

    def contains_prefix(self, keys: Sequence[str]) -> int:
        if self.fail == "lookup":
            raise OSError("lookup exploded")
        return len(keys)

    def load_prefix(self, keys: Sequence[str], buffers: Sequence[ChunkBuffer]) -> int:
        raise RuntimeError("load exploded")

    def submit(self, key: str, buffer: ChunkBuffer, done: WriteDone) -> None:
        raise RuntimeError("submit exploded")

    def close(self) -> None:
        pass


@pytest.mark.parametrize("fail", ["lookup", "load"])
def test_a_raising_tier_is_a_miss_without_leaks(fail: str) -> None:
    from lmcache import LMCacheEngineConfig

    config = LMCacheEngineConfig.from_mapping(
        {"chunk_size": CHUNK, "max_local_cpu_size": pool_gb(8)}
    )
    with LMCacheEngine(config, SPEC, "m", lower_tiers=[RaisingTier(fail)]) as engine:
        kv = random_kv(32)
        assert engine.store(make_tokens(32), kv) == 32, "a failed write-back only skips the tier"
        assert engine.lookup(make_tokens(64)) == (32 if fail == "lookup" else 64)
        n, out = engine.retrieve(make_tokens(64))
        assert n == 32 and torch.equal(out[:, :, :32], kv)
        assert no_leaked_slots(engine)


def test_lru_keeps_a_prefix_head_longest(make_engine: EngineFactory) -> None:
    """Filling the pool with a second prompt evicts the first prompt from its end: what is
    left of it is still a reachable prefix."""
    engine = make_engine(max_local_cpu_size=pool_gb(6))
    first, second = make_tokens(4 * CHUNK), make_tokens(4 * CHUNK, offset=10_000)
    engine.store(first, random_kv(4 * CHUNK))
    assert engine.retrieve(first)[0] == 4 * CHUNK  # touched: the whole prompt is recent
    engine.store(second, random_kv(4 * CHUNK, seed=1))
    assert engine.lookup(first) == 2 * CHUNK, "the first two chunks of the first prompt survive"
    assert engine.lookup(second) == 4 * CHUNK


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([1.0, 2.5]),
        np.array([1.0, 2.0]),
        torch.tensor([1, 1 << 32]),
        np.array([-1, 2]),
        [1, 1 << 32],
        [1, -3],
        [1.5, 2],
    ],
    ids=[
        "float-tensor",
        "float-array",
        "tensor-2^32",
        "negative-array",
        "list-2^32",
        "list-neg",
        "list-float",
    ],
)
def test_token_ids_outside_uint32_are_refused(make_engine: EngineFactory, bad: object) -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 4294967295\]"):
        engine.lookup(bad)  # type: ignore[arg-type]


def test_context_separates_keys(make_engine: EngineFactory) -> None:
    """Tenants (cache_salt), adapters and images with the same token ids get different keys;
    a multimodal item changes only the chunks from its placeholder on."""
    engine = make_engine()
    ids = make_tokens(48)
    plain = [c.key for c in engine.chunks(ids)]
    for context in (KVContext(cache_salt="tenant-a"), KVContext(lora="adapter-1")):
        assert not set(plain) & {c.key for c in engine.chunks(ids, context)}
    image_a = [c.key for c in engine.chunks(ids, KVContext(multimodal=((20, "img-a"),)))]
    image_b = [c.key for c in engine.chunks(ids, KVContext(multimodal=((20, "img-b"),)))]
    assert image_a[0] == plain[0], "the chunk before the placeholder is shared"
    assert image_a[1:] != plain[1:] and image_a[1:] != image_b[1:]
    assert [c.key for c in engine.chunks(ids, KVContext())] == plain


def test_closed_engine_says_so(make_engine: EngineFactory) -> None:
    engine = make_engine()
    engine.store(make_tokens(16), random_kv(16))
    engine.close()
    for call in (
        lambda: engine.lookup(make_tokens(16)),
        lambda: engine.retrieve(make_tokens(16)),
        lambda: engine.store(make_tokens(16), random_kv(16)),
        lambda: engine.prefetch(make_tokens(16)),
        lambda: engine.flush(),
    ):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    engine.close()  # idempotent


def test_retrieve_into_a_buffer_of_another_dtype_is_refused(make_engine: EngineFactory) -> None:
    engine = make_engine()
    engine.store(make_tokens(16), random_kv(16))
    with pytest.raises(ValueError, match="expected"):
        engine.retrieve(make_tokens(16), out=torch.empty(SPEC.shape(16), dtype=torch.float32))
