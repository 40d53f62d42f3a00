"""The remote tier against a real redis-server: round trips, misses, TTL, validation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lmcache.storage import serde
from lmcache.storage.remote.devserver import RedisServer

from .conftest import CHUNK, Raw, Tier


def keys_for(n: int, tag: str = "k") -> list[str]:
    return [f"m@1@0@bfloat16@{tag}{i:04d}" for i in range(n)]


def test_round_trip_is_byte_exact(server: RedisServer, make_tier: Callable[..., Tier]) -> None:
    tier = make_tier(server.url)
    keys = keys_for(3)
    sent = [tier.buffer(CHUNK, 1), tier.buffer(CHUNK, 2), tier.buffer(5, 3)]
    tier.write(keys, sent)

    assert tier.backend.contains_prefix(keys) == 3
    got = [tier.empty(b.num_tokens) for b in sent]
    assert tier.backend.load_prefix(keys, got) == 3
    for a, b in zip(sent, got, strict=True):
        assert b.num_tokens == a.num_tokens
        assert torch.equal(a.raw(), b.raw())
    assert tier.metrics.value("lmcache:num_remote_write_requests_total") == 3
    assert tier.metrics.value("lmcache:num_remote_read_requests_total") == 3
    put_bytes = sum(b.nbytes for b in sent)
    assert tier.metrics.value("lmcache:num_remote_write_bytes_total") == put_bytes
    assert tier.metrics.value("lmcache:num_remote_read_bytes_total") == put_bytes


def test_value_is_header_plus_payload_in_one_string(
    server: RedisServer, make_tier: Callable[..., Tier]
) -> None:
    tier = make_tier(server.url)
    [key] = keys_for(1)
    buffer = tier.buffer(CHUNK, 7)
    tier.write([key], [buffer])
    stored = Raw(server).get(key)
    header = serde.decode_header(stored)
    assert header.key == key
    assert header.shape == tier.spec.shape(CHUNK)
    assert stored[header.size :] == bytes(buffer.raw().numpy())


def test_prefix_stops_at_first_miss(server: RedisServer, make_tier: Callable[..., Tier]) -> None:
    tier = make_tier(server.url)
    keys = keys_for(4)
    tier.write([keys[0], keys[2], keys[3]], [tier.buffer(CHUNK, i) for i in range(3)])
    assert tier.backend.contains_prefix(keys) == 1
    got = [tier.empty() for _ in keys]
    assert tier.backend.load_prefix(keys, got) == 1
    # The connection left with unread replies was dropped: the next request is not confused.
    assert tier.backend.load_prefix(keys[2:], got[:2]) == 2
    assert tier.backend.contains_prefix(keys[2:]) == 2


def test_ttl_is_set_when_configured(server: RedisServer, make_tier: Callable[..., Tier]) -> None:
    tier = make_tier(server.url, remote_ttl_s=300)
    [key] = keys_for(1)
    tier.write([key], [tier.buffer(CHUNK, 1)])
    assert 0 < Raw(server).ttl(key) <= 300


def test_no_ttl_by_default(server: RedisServer, make_tier: Callable[..., Tier]) -> None:
    tier = make_tier(server.url)
    [key] = keys_for(1)
    tier.write([key], [tier.buffer(CHUNK, 1)])
    assert Raw(server).ttl(key) == -1


def _flip_payload_byte(value: bytes) -> bytes:
    return value[:-1] + bytes([value[-1] ^ 0xFF])


def _wrong_version(value: bytes) -> bytes:
    return value[:4] + (serde.VERSION + 1).to_bytes(2, "little") + value[6:]


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "payload byte flipped": _flip_payload_byte,
    "truncated payload": lambda v: v[: len(v) - 100],
    "truncated header": lambda v: v[:20],
    "empty": lambda v: b"",
    "bad magic": lambda v: b"XXXX" + v[4:],
    "wrong version": _wrong_version,
    "trailing garbage": lambda v: v + b"junk",
    "not ours at all": lambda v: b"hello world",
}


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_corrupt_value_is_a_miss_never_data(
    damage: str, server: RedisServer, make_tier: Callable[..., Tier]
) -> None:
    tier = make_tier(server.url)
    keys = keys_for(3)
    tier.write(keys, [tier.buffer(CHUNK, i) for i in range(3)])
    raw = Raw(server)
    raw.set(keys[1], CORRUPTIONS[damage](raw.get(keys[1])))

    got = [tier.empty() for _ in keys]
    assert tier.backend.load_prefix(keys, got) == 1
    assert tier.value("lmcache_corrupt_values_total") == 1
    assert not raw.exists(keys[1]), "a refused value is deleted so it gets rewritten"
    assert tier.backend.load_prefix(keys[2:], got[2:]) == 1


def test_value_of_another_key_is_refused(
    server: RedisServer, make_tier: Callable[..., Tier]
) -> None:
    """A header naming another key (a swapped or misdirected value) is never loaded."""
    tier = make_tier(server.url)
    keys = keys_for(2)
    tier.write(keys, [tier.buffer(CHUNK, 1), tier.buffer(CHUNK, 2)])
    raw = Raw(server)
    raw.set(keys[0], raw.get(keys[1]))
    got = tier.empty()
    assert tier.backend.load_prefix(keys[:1], [got]) == 0
    assert tier.value("lmcache_corrupt_values_total") == 1


def test_value_of_another_spec_is_refused(
    server: RedisServer, make_tier: Callable[..., Tier]
) -> None:
    """Same key, different dtype or shape (a misconfigured pod): refused, not reinterpreted."""
    tier = make_tier(server.url)
    [key] = keys_for(1)
    buffer = tier.buffer(CHUNK, 1)
    payload = buffer.raw().numpy().data
    header = serde.Header(
        key, "float16", tier.spec.shape(CHUNK), len(payload), serde.checksum(payload)
    )
    Raw(server).set(key, header.encode() + bytes(payload))
    assert tier.backend.load_prefix([key], [tier.empty()]) == 0
    assert tier.value("lmcache_corrupt_values_total") == 1


def test_value_larger_than_a_slot_is_refused(
    server: RedisServer, make_tier: Callable[..., Tier]
) -> None:
    """A well-formed value of more tokens than a chunk would overflow the slot: refused before
    a single payload byte is read."""
    tier = make_tier(server.url)
    [key] = keys_for(1)
    payload = bytes(2 * CHUNK * tier.spec.bytes_per_token)
    header = serde.Header(
        key, tier.spec.dtype_name, tier.spec.shape(2 * CHUNK), len(payload), serde.checksum(payload)
    )
    Raw(server).set(key, header.encode() + payload)
    got = tier.empty()
    neighbour = tier.buffer(CHUNK, 9)  # the next slot of the pool, which an overflow would hit
    assert neighbour.slot == got.slot + 1
    before = bytes(neighbour.raw().numpy())
    assert tier.backend.load_prefix([key], [got]) == 0
    assert tier.value("lmcache_corrupt_values_total") == 1
    assert bytes(neighbour.raw().numpy()) == before


def test_value_holding_fewer_tokens_than_the_chunk_is_refused(
    server: RedisServer, make_tier: Callable[..., Tier]
) -> None:
    """A self-consistent value of 5 tokens where a full chunk is expected: loading it would
    leave the rest of the chunk as whatever the slot held before, i.e. wrong KV."""
    tier = make_tier(server.url)
    (key,) = keys_for(1)
    tier.write([key], [tier.buffer(5, 1)])
    assert tier.backend.load_prefix([key], [tier.empty(CHUNK)]) == 0
    assert tier.value("lmcache_corrupt_values_total") == 1
