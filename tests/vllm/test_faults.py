"""A cache must never be worse than no cache: faults between lookup and load, under vLLM's
real scheduler, with both ``kv_load_failure_policy`` values and chunk sizes 16 and 256.

Each case asserts what a user would see: no request fails because of the cache (under
``fail``, only a failed GPU copy may fail one), the paged KV equals a forward pass over the
whole sequence, everything the engine holds is the true KV of its prefix, and no pool slot
is left pinned or in flight.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from vllm.v1.engine import FinishReason

from lmcache.integration.vllm.paged import PagedTransfer
from lmcache.storage.disk import DiskBackend
from lmcache.storage.remote.devserver import BINARY, RedisServer
from tests.vllm.conftest import CHUNK, HEAD_SIZE, HEADS, LAYERS, Rig, RigFactory
from tests.vllm.test_scheduler import lookup_line, prompt


@dataclass(frozen=True)
class Case:
    policy: str
    chunk: int

    @property
    def length(self) -> int:
        """A prompt of 2.5 chunks: full chunks and a partial tail."""
        return 2 * self.chunk + self.chunk // 2

    @property
    def chunk_gb(self) -> float:
        return self.chunk * LAYERS * 2 * HEADS * HEAD_SIZE * 4 / (1 << 30)

    def rig(self, rig_factory: RigFactory, pool_chunks: int = 64, **extra: Any) -> Rig:
        return rig_factory(
            {
                "lmcache.chunk_size": self.chunk,
                "lmcache.max_local_cpu_size": pool_chunks * self.chunk_gb,
                **extra,
            },
            policy=self.policy,
            max_num_batched_tokens=max(64, self.chunk),
            num_blocks=512,
        )


CASES = [Case(p, c) for p in ("fail", "recompute") for c in (16, 256)]


@pytest.fixture(params=CASES, ids=lambda c: f"{c.policy}-chunk{c.chunk}")
def case(request: pytest.FixtureRequest) -> Case:
    return request.param  # type: ignore[no-any-return]


def clean(rig: Rig, *requests: str) -> None:
    """The user's view: no failed request, and nothing leaked."""
    failed = {r for r, reason in rig.finished.items() if reason == FinishReason.ERROR}
    assert not failed, f"requests failed because of the cache: {failed}"
    for req_id in requests:
        rig.check(req_id, 0, len(rig.prompts[req_id]))
    rig.no_leaks()


def stored_then_new_rig(
    case: Case, rig_factory: RigFactory, tokens: list[int], **extra: Any
) -> Rig:
    """Store ``tokens`` through one vLLM instance with lower tiers (``extra``), wait for the
    write-back, shut it down, and start another on the same tiers: its CPU pool is empty."""
    first = case.rig(rig_factory, **extra)
    first.add("writer", tokens)
    first.run()
    assert first.engine.flush(timeout=30)
    first.close_worker()
    return case.rig(rig_factory, **extra)


def test_eviction_pressure_between_lookup_and_load(case: Case, rig_factory: RigFactory) -> None:
    """Once promised, a chunk stays: stores that need every evictable slot in between cannot
    take the pinned ones."""
    chunks = 3
    rig = case.rig(rig_factory, pool_chunks=chunks + 2)
    tokens = prompt(case.length)
    rig.add("r1", tokens)
    rig.run()
    rig.evict_gpu()
    rig.add("r2", tokens)
    output = rig.schedule()
    other = prompt(8 * case.chunk, seed=5)
    rig.engine.store(other, rig.engine_kv(other))  # wants every slot of the pool
    rig.update(output, rig.execute(output))
    rig.run()
    assert rig.load_errors == [set()] * len(rig.load_errors)
    clean(rig, "r2")
    assert rig.check_stored(tokens) == chunks


def test_corrupt_disk_file_is_recomputed_not_failed(
    case: Case, rig_factory: RigFactory, tmp_path: Path, lmcache_log: list[str]
) -> None:
    tokens = prompt(case.length)
    disk = {"lmcache.local_disk": str(tmp_path), "lmcache.max_local_disk_size": 0.05}
    rig = stored_then_new_rig(case, rig_factory, tokens, **disk)
    tier = rig.engine.storage.lower[0]
    assert isinstance(tier, DiskBackend)
    second = tier.path_of(rig.engine.chunks(tokens)[1].key)
    data = bytearray(second.read_bytes())
    data[-10] ^= 0xFF
    second.write_bytes(data)

    rig.add("r2", tokens)
    rig.run()
    assert lookup_line("r2", case.length, case.chunk, case.chunk) in lmcache_log
    clean(rig, "r2")
    assert rig.check_stored(tokens) == 3, "the corrupt chunk was recomputed and stored again"


def test_valkey_killed_after_the_lookup(
    case: Case, rig_factory: RigFactory, tmp_path: Path
) -> None:
    if shutil.which(BINARY) is None:
        pytest.skip(f"{BINARY} not installed (CI installs Debian's redis-server via .ci/run)")
    server = RedisServer(tmp_path)
    server.start()
    try:
        tokens = prompt(case.length)
        remote = {"lmcache.remote_url": server.url, "lmcache.remote_timeout_ms": 2000}
        rig = stored_then_new_rig(case, rig_factory, tokens, **remote)
        rig.add("r2", tokens)
        output = rig.schedule()  # looked up: staging from Valkey has started (or finished)
        server.kill()
        rig.update(output, rig.execute(output))
        rig.run()
        clean(rig, "r2")
    finally:
        server.stop()


def test_a_disk_hit_longer_than_the_pool_loads_what_fits(
    case: Case, rig_factory: RigFactory, tmp_path: Path, lmcache_log: list[str]
) -> None:
    tokens = prompt(4 * case.chunk)
    disk = {"lmcache.local_disk": str(tmp_path), "lmcache.max_local_disk_size": 0.05}
    writer = case.rig(rig_factory, **disk)
    writer.add("writer", tokens)
    writer.run()
    assert writer.engine.flush(timeout=30)
    writer.close_worker()
    rig = case.rig(rig_factory, pool_chunks=2, **disk)  # 4 chunks on disk, 2 slots in the pool
    rig.add("r2", tokens)
    rig.run()
    assert lookup_line("r2", 4 * case.chunk, 2 * case.chunk, 2 * case.chunk) in lmcache_log
    clean(rig, "r2")


def test_many_loads_in_one_step(case: Case, rig_factory: RigFactory) -> None:
    rig = case.rig(rig_factory)
    prompts = {f"p{i}": prompt(case.length, seed=10 + i) for i in range(4)}
    for req_id, tokens in prompts.items():
        rig.add(f"w{req_id}", tokens)
    rig.run()
    rig.evict_gpu()
    for req_id, tokens in prompts.items():
        rig.add(req_id, tokens)
    first = rig.step()
    assert sum(1 for new in first.scheduled_new_reqs if new.num_computed_tokens > 0) == 4
    rig.run()
    value = rig.engine.metrics.value
    loaded = sum(new.num_computed_tokens for new in first.scheduled_new_reqs)
    assert value("lmcache:num_requested_tokens_total") == loaded
    assert value("lmcache:num_hit_tokens_total") == loaded
    clean(rig, *prompts)


def test_a_failed_copy_stores_nothing_computed_over_it(
    case: Case, rig_factory: RigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load that fails part-way while the same step computes the request's next chunks:
    those chunks were computed over missing context and must never be stored. Under ``fail``
    the request fails (a GPU copy error is the one failure the cache may cause); under
    ``recompute`` vLLM recomputes and the recomputed chunks are stored."""
    rig = rig_factory(
        {"lmcache.chunk_size": case.chunk, "lmcache.max_local_cpu_size": 64 * case.chunk_gb},
        policy=case.policy,
        max_num_batched_tokens=8 * case.chunk,
        num_blocks=512,
    )
    shared = prompt(2 * case.chunk)
    rig.add("r1", shared)
    rig.run()
    rig.evict_gpu()
    tokens = [*shared, *prompt(2 * case.chunk, seed=3)]
    rig.add("r2", tokens)
    real = PagedTransfer.start_load
    calls = []

    def broken_once(self: PagedTransfer, jobs: Any, layerwise: bool) -> Any:
        calls.append(len(jobs))
        if len(calls) == 1:  # a device fault cannot be provoked on CPU tensors
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self, jobs, layerwise)

    monkeypatch.setattr(PagedTransfer, "start_load", broken_once)
    rig.run()
    assert calls, "the load was attempted"
    value = rig.engine.metrics.value
    assert value("lmcache:num_requested_tokens_total") > value("lmcache:num_hit_tokens_total")
    assert rig.check_stored(tokens) in (2, 4), "whatever is stored is the true KV"
    if case.policy == "fail":
        assert rig.finished["r2"] == FinishReason.ERROR
        assert rig.check_stored(tokens) == 2, "nothing computed over the failed load"
    else:
        assert rig.finished["r2"] != FinishReason.ERROR
        rig.check("r2", 0, len(tokens))
        assert rig.check_stored(tokens) == 4, "recomputed chunks are stored"
    rig.no_leaks()


def test_a_store_that_fails_after_reserving_gives_its_slots_back(
    rig_factory: RigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planning a store fails after its slots were reserved: the slots and the chunks' pending
    keys are returned, so the request completes and the next request stores the chunks."""
    from lmcache.integration.vllm import worker as worker_module

    rig: Rig = rig_factory()
    tokens = prompt(100)
    real = worker_module.store_jobs
    calls = []

    def broken_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:  # the copies' plan: a fault no real input provokes on purpose
            raise RuntimeError("planning failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(worker_module, "store_jobs", broken_once)
    rig.add("r1", tokens)
    rig.run()
    assert rig.finished["r1"] != FinishReason.ERROR
    assert rig.check_stored(tokens) == 0, "the failed plan's first chunk was not stored"
    rig.no_leaks()
    rig.evict_gpu()
    rig.add("r2", tokens)
    rig.run()
    rig.evict_gpu()
    assert rig.check_stored(tokens) == -(-len(tokens) // CHUNK), "the chunks were stored after all"
    assert len(calls) >= 2, "the fault fired once, then stores were planned again"
    rig.no_leaks()
