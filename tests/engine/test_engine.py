from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from lmcache import ConfigError, KVSpec, LMCacheEngine, LMCacheEngineConfig
from tests.engine.conftest import CHUNK, CHUNK_BYTES, SPEC, EngineFactory, random_kv, tokens


def test_round_trip_is_byte_exact(make_engine: EngineFactory) -> None:
    engine = make_engine()
    kv = random_kv(100)
    assert engine.store(tokens(100), kv) == 100
    n, out = engine.retrieve(tokens(100))
    assert n == 100 and torch.equal(out.view(torch.int16), kv.view(torch.int16))


def test_lookup_is_longest_prefix(make_engine: EngineFactory) -> None:
    engine = make_engine()
    engine.store(tokens(64), random_kv(64))
    assert engine.lookup(tokens(64)) == 64
    assert engine.lookup(tokens(100)) == 64, "a longer prompt hits the stored prefix"
    assert engine.lookup(tokens(40)) == 32, "a shorter prompt hits its full chunks"
    diverged = tokens(64)
    diverged[20] = 999
    assert engine.lookup(diverged) == 16, "a change in chunk 1 stops the hit at chunk 0"
    assert engine.lookup(tokens(64, offset=1)) == 0


def test_retrieve_matches_lookup_and_kv_slice(make_engine: EngineFactory) -> None:
    engine = make_engine()
    kv = random_kv(64)
    engine.store(tokens(64), kv)
    query = [*tokens(48), 7, 7, 7]
    n, out = engine.retrieve(query)
    assert n == engine.lookup(query) == 48
    assert torch.equal(out, kv[:, :, :48])


def test_retrieve_into_caller_buffer(make_engine: EngineFactory) -> None:
    engine = make_engine()
    kv = random_kv(64)
    engine.store(tokens(64), kv)
    out = torch.zeros(SPEC.shape(80), dtype=SPEC.dtype)
    n, view = engine.retrieve(tokens(80), out=out)
    assert n == 64 and view.data_ptr() == out.data_ptr()
    assert torch.equal(out[:, :, :64], kv) and not out[:, :, 64:].any()


def test_store_skips_chunks_already_stored(make_engine: EngineFactory) -> None:
    engine = make_engine()
    engine.store(tokens(32), random_kv(32))
    assert engine.store(tokens(64), random_kv(64)) == 32
    assert engine.store(tokens(64), random_kv(64)) == 0


def test_store_with_offset_covers_only_the_tail(make_engine: EngineFactory) -> None:
    engine = make_engine()
    kv = random_kv(64)
    engine.store(tokens(32), kv[:, :, :32])
    assert engine.store(tokens(64), kv[:, :, 32:].clone(), kv_offset=32) == 32
    assert torch.equal(engine.retrieve(tokens(64))[1], kv)


def test_partial_chunk_only_with_save_unfull_chunk(make_engine: EngineFactory) -> None:
    saving = make_engine(save_unfull_chunk=True)
    assert saving.store(tokens(40), random_kv(40)) == 40
    assert saving.lookup(tokens(40)) == 40
    assert saving.lookup(tokens(45)) == 32, "the partial chunk's key covers exactly 40 tokens"
    full_only = make_engine(save_unfull_chunk=False)
    assert full_only.store(tokens(40), random_kv(40)) == 32
    assert full_only.lookup(tokens(40)) == 32


def test_wrong_kv_shape_is_refused(make_engine: EngineFactory) -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match="expected"):
        engine.store(tokens(32), random_kv(31))
    with pytest.raises(ValueError, match="expected"):
        engine.store(tokens(32), random_kv(32).float())


def test_lru_eviction_under_pressure(make_engine: EngineFactory) -> None:
    engine = make_engine(max_local_cpu_size=4 * CHUNK_BYTES / (1 << 30))
    a, b, c = tokens(32, 0), tokens(32, 1000), tokens(32, 2000)
    engine.store(a, random_kv(32, 1))
    engine.store(b, random_kv(32, 2))
    assert engine.lookup(a) == 32
    engine.retrieve(a)  # a becomes most recently used
    engine.store(c, random_kv(32, 3))
    assert engine.lookup(a) == 32 and engine.lookup(c) == 32
    assert engine.lookup(b) == 0, "b was least recently used"
    assert engine.metrics.value("lmcache:local_cpu_evict_count_total") == 2


def test_pinned_chunks_survive_and_full_pool_skips_stores(make_engine: EngineFactory) -> None:
    engine = make_engine(max_local_cpu_size=2 * CHUNK_BYTES / (1 << 30))
    kv = random_kv(32)
    engine.store(tokens(32), kv)
    with engine.retrieve_chunks(tokens(32)) as views:
        assert len(views) == 2
        stored = engine.store(tokens(32, 5000), random_kv(32))
        assert stored == 0, "every slot is pinned by the in-flight load"
        assert engine.metrics.value("lmcache_skipped_stores_total") == 2
        assert torch.equal(torch.cat([v for _, v in views], dim=2), kv)
    assert engine.store(tokens(32, 5000), random_kv(32)) == 32, "room again after the load"


def test_local_cpu_false_keeps_nothing_in_cpu(make_engine: EngineFactory) -> None:
    engine = make_engine(local_cpu=False)
    assert engine.store(tokens(32), random_kv(32)) == 0
    assert engine.lookup(tokens(32)) == 0
    assert engine.storage.pool.free_slots == engine.storage.pool.num_slots


def test_pool_too_small_for_one_chunk_is_a_config_error() -> None:
    config = LMCacheEngineConfig.from_mapping(
        {"chunk_size": CHUNK, "max_local_cpu_size": (CHUNK_BYTES - 1) / (1 << 30)}
    )
    with pytest.raises(ConfigError, match=r"max_local_cpu_size: .*holds no chunk"):
        LMCacheEngine(config, SPEC, "m")


def test_hugepages_fall_back_on_cpu_platform(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    if torch.cuda.is_available():
        pytest.skip(
            "fallback applies to non-CUDA platforms; tests/engine/test_hugepages.py covers CUDA"
        )
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        engine = make_engine(local_cpu_use_hugepages=True)
    assert not engine.storage.pool.hugepages
    assert any("non-CUDA" in r.getMessage() for r in caplog.records)
    engine.store(tokens(16), random_kv(16))
    assert engine.lookup(tokens(16)) == 16


def test_seed_log_lines(make_engine: EngineFactory, caplog: pytest.LogCaptureFixture) -> None:
    engine = make_engine()
    with caplog.at_level(logging.INFO, logger="lmcache"):
        engine.store(tokens(40), random_kv(40), request_id="req-1")
        engine.lookup(tokens(40), request_id="req-2")
    lines = [r.getMessage() for r in caplog.records]
    assert "Storing KV cache for 40 out of 40 tokens for request req-1" in lines
    assert "Reqid: req-2, Total tokens 40, LMCache hit tokens: 40, need to load: 40" in lines


def test_metrics_count_traffic(make_engine: EngineFactory) -> None:
    engine = make_engine()
    engine.store(tokens(32), random_kv(32))
    engine.lookup(tokens(48))
    engine.retrieve(tokens(32))
    value = engine.metrics.value
    assert value("lmcache:num_stored_tokens_total") == 32
    assert value("lmcache_stored_bytes_total") == 32 * SPEC.bytes_per_token
    assert value("lmcache:num_lookup_tokens_total") == 48
    assert value("lmcache:num_lookup_hits_total") == 32
    assert value("lmcache:num_hit_tokens_total") == 32
    assert value("lmcache:local_cache_usage") == 2 * CHUNK_BYTES
    assert value("lmcache:local_cpu_hot_cache_count") == 2


def test_mla_spec_round_trip() -> None:
    spec = KVSpec.mla(num_layers=3, head_size=32, dtype=torch.float16)
    config = LMCacheEngineConfig.from_mapping({"chunk_size": CHUNK, "max_local_cpu_size": 0.01})
    with LMCacheEngine(config, spec, "mla-model") as engine:
        kv = torch.randn(spec.shape(40)).half()
        engine.store(tokens(40), kv)
        n, out = engine.retrieve(tokens(40))
        assert n == 40 and torch.equal(out, kv)


def test_bad_remote_url_fails_before_the_pool_is_allocated(monkeypatch: pytest.MonkeyPatch) -> None:
    allocated: list[int] = []
    real_empty = torch.zeros

    def recording_zeros(*args: Any, **kwargs: Any) -> torch.Tensor:
        allocated.append(1)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", recording_zeros)
    config = LMCacheEngineConfig.from_mapping(
        {"chunk_size": CHUNK, "max_local_cpu_size": 0.01, "remote_url": "valkey://h:notaport"}
    )
    with pytest.raises(ConfigError, match="remote_url"):
        LMCacheEngine(config, SPEC, "m")
    assert not allocated, "the pool must not be allocated for a config that cannot work"
    with LMCacheEngine(LMCacheEngineConfig.from_mapping({"max_local_cpu_size": 0.01}), SPEC, "m"):
        assert allocated, "the probe sees the pool's allocation (else the check above is void)"
