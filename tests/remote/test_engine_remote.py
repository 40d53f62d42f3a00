"""The remote tier through the public engine: shared across processes, promoted to CPU,
prefetchable, and harmless when the server dies mid-workload."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from lmcache import LMCacheEngine, LMCacheEngineConfig
from lmcache.storage.remote.devserver import RedisServer

from .conftest import BOUND_S, CHUNK, RELAXED_TIMEOUT_MS, SPEC, pool_gb, wait_until

MODEL = "shared-model"
EngineFactory = Callable[..., LMCacheEngine]
OPS = ("lookup", "get", "put", "probe")


def random_kv(num_tokens: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(SPEC.shape(num_tokens), generator=gen).to(SPEC.dtype)


def prompt(n: int, offset: int) -> list[int]:
    return list(range(offset, offset + n))


def new_engine(url: str, **config: Any) -> LMCacheEngine:
    values = {
        "chunk_size": CHUNK,
        "max_local_cpu_size": pool_gb(64),
        "remote_url": url,
        "remote_timeout_ms": RELAXED_TIMEOUT_MS,
        **config,
    }
    return LMCacheEngine(LMCacheEngineConfig.from_mapping(values), SPEC, model_name=MODEL)


@pytest.fixture
def make_engine() -> Iterator[EngineFactory]:
    engines: list[LMCacheEngine] = []

    def make(url: str, **config: Any) -> LMCacheEngine:
        engines.append(new_engine(url, **config))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def remote_hits(engine: LMCacheEngine) -> float:
    return engine.metrics.value("lmcache_tier_hit_chunks_total", tier="remote")


def _store_in_child(url: str, tokens: list[int], seed: int) -> None:
    """Runs in a separate (spawned) process: one pod storing a prefix."""
    with new_engine(url) as engine:
        assert engine.store(tokens, random_kv(len(tokens), seed)) == len(tokens)
        assert engine.flush(30)


def test_prefix_stored_by_one_process_is_hit_by_another(
    server: RedisServer, make_engine: EngineFactory
) -> None:
    tokens = prompt(5 * CHUNK + 3, offset=1000)
    child = multiprocessing.get_context("spawn").Process(
        target=_store_in_child, args=(server.url, tokens, 42)
    )
    child.start()
    child.join(120)
    assert child.exitcode == 0

    engine = make_engine(server.url)
    assert engine.lookup(tokens) == len(tokens)
    n, kv = engine.retrieve(tokens)
    assert n == len(tokens)
    assert torch.equal(kv, random_kv(len(tokens), 42)), "byte-exact KV from the other process"
    assert remote_hits(engine) == 6
    before = remote_hits(engine)
    engine.retrieve(tokens)
    assert remote_hits(engine) == before, "remote hits were promoted to CPU"


def test_prefetch_loads_from_remote(server: RedisServer, make_engine: EngineFactory) -> None:
    tokens = prompt(4 * CHUNK, offset=7)
    writer = make_engine(server.url)
    writer.store(tokens, random_kv(len(tokens), 3))
    assert writer.flush(30)

    reader = make_engine(server.url)
    assert reader.prefetch(tokens).wait(30) == len(tokens)
    assert remote_hits(reader) == 4
    n, kv = reader.retrieve(tokens)
    assert n == len(tokens) and torch.equal(kv, random_kv(len(tokens), 3))
    assert remote_hits(reader) == 4, "served from CPU after the prefetch"


def test_server_killed_mid_workload(server: RedisServer, make_engine: EngineFactory) -> None:
    engine = make_engine(server.url, remote_breaker_failures=2, remote_breaker_backoff_s=0.1)
    prompts = [prompt(3 * CHUNK, offset=10_000 * i) for i in range(8)]
    for i, tokens in enumerate(prompts[:4]):
        engine.store(tokens, random_kv(len(tokens), i))
    assert engine.flush(30)

    server.kill()
    for i, tokens in enumerate(prompts[4:], start=4):
        start = time.monotonic()
        assert engine.lookup(tokens) == 0  # CPU miss, remote down: a miss, not an error
        engine.store(tokens, random_kv(len(tokens), i))
        n, kv = engine.retrieve(tokens)
        assert time.monotonic() - start < BOUND_S
        assert n == len(tokens) and torch.equal(kv, random_kv(len(tokens), i))
    m = engine.metrics
    errors = sum(m.value("lmcache_tier_errors_total", tier="remote", op=op) for op in OPS)
    assert errors >= 2, "failures are counted (they opened the breaker)"
    assert m.value("lmcache_remote_breaker_open") == 1
    assert m.value("lmcache_dropped_writes_total", tier="remote") >= 1

    server.start()  # same port, empty
    wait_until(lambda: m.value("lmcache_remote_breaker_open") == 0)
    fresh = prompt(2 * CHUNK, offset=99_000)
    engine.store(fresh, random_kv(len(fresh), 99))
    assert engine.flush(30)
    other = make_engine(server.url)
    n, kv = other.retrieve(fresh)
    assert n == len(fresh) and torch.equal(kv, random_kv(len(fresh), 99))
    assert remote_hits(other) == 2
