"""Llama-8B-sized (32 MiB) values, many keys in one round trip, and concurrent threads."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from lmcache.spec import KVSpec
from lmcache.storage.remote.devserver import RedisServer

from .conftest import CHUNK, Tier, wait_until

LLAMA_8B = KVSpec(num_layers=32, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
LLAMA_CHUNK = 256


def test_32_mib_values_round_trip(server: RedisServer, make_tier: Callable[..., Tier]) -> None:
    tier = make_tier(server.url, spec=LLAMA_8B, chunk=LLAMA_CHUNK, slots=8)
    keys = [f"llama@1@0@bfloat16@{i}" for i in range(3)]
    sent = [tier.buffer(LLAMA_CHUNK, i) for i in range(3)]
    assert sent[0].nbytes == 32 << 20
    tier.write(keys, sent)
    got = [tier.empty() for _ in keys]
    assert tier.backend.load_prefix(keys, got) == 3
    for a, b in zip(sent, got, strict=True):
        assert torch.equal(a.raw(), b.raw())


def test_many_keys_in_one_request(server: RedisServer, make_tier: Callable[..., Tier]) -> None:
    tier = make_tier(server.url, slots=2100)
    keys = [f"m@1@0@bfloat16@many{i}" for i in range(1000)]
    sent = [tier.buffer(CHUNK, i) for i in range(1000)]
    tier.write(keys, sent)
    assert tier.backend.contains_prefix(keys) == 1000
    got = [tier.empty() for _ in keys]
    assert tier.backend.load_prefix(keys, got) == 1000
    assert all(torch.equal(a.raw(), b.raw()) for a, b in zip(sent, got, strict=True))
    assert tier.metrics.value("lmcache_remote_lookups_total") == 1, "one round trip"


def test_concurrent_threads(server: RedisServer, make_tier: Callable[..., Tier]) -> None:
    tier = make_tier(server.url, slots=400)
    shared = [f"m@1@0@bfloat16@shared{i}" for i in range(10)]
    tier.write(shared, [tier.buffer(CHUNK, 10_000 + i) for i in range(10)])

    def worker(t: int) -> bool:
        keys = [f"m@1@0@bfloat16@t{t}-{i}" for i in range(20)]
        sent = [tier.buffer(CHUNK, t * 100 + i) for i in range(20)]
        for key, buffer in zip(keys, sent, strict=True):
            tier.backend.submit(key, buffer, tier.done)
        ok = True
        for _ in range(5):
            got = [tier.empty() for _ in shared]
            ok &= tier.backend.load_prefix(shared, got) == len(shared)
            ok &= all(b.num_tokens == CHUNK for b in got)
            for b in got:
                tier.pool.free(b)
        assert tier.backend.flush(30)
        got = [tier.empty() for _ in keys]
        ok &= tier.backend.load_prefix(keys, got) == len(keys)
        ok &= all(torch.equal(a.raw(), b.raw()) for a, b in zip(sent, got, strict=True))
        return ok

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(worker, range(8)))
    assert tier.value("lmcache_tier_errors_total", op="get") == 0
    assert tier.value("lmcache_dropped_writes_total") == 0


def test_server_killed_during_a_large_load_never_yields_partial_chunks(
    server: RedisServer, make_tier: Callable[..., Tier]
) -> None:
    """Killed mid-transfer: the chunks reported loaded are whole and exact, the rest unset."""
    tier = make_tier(server.url, spec=LLAMA_8B, chunk=LLAMA_CHUNK, slots=12)
    keys = [f"llama@1@0@bfloat16@kill{i}" for i in range(6)]
    sent = [tier.buffer(LLAMA_CHUNK, 100 + i) for i in range(6)]
    tier.write(keys, sent)
    got = [tier.empty() for _ in keys]
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(tier.backend.load_prefix, keys, got)
        # the transfer is under way once bytes land in the first slot
        wait_until(lambda: bool(got[0].raw()[-4096:].any()) or loading.done())
        server.kill()
        loaded = loading.result(timeout=60)
    assert 1 <= loaded <= len(keys)
    for a, b in zip(sent[:loaded], got[:loaded], strict=True):
        assert torch.equal(a.raw(), b.raw())
