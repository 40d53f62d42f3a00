"""A dead, slow or restarted server: misses and metrics within the deadline, never a hang."""

from __future__ import annotations

import os
import signal
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lmcache.storage.remote.devserver import RedisServer, free_port

from .conftest import BOUND_S, CHUNK, CHUNK_BYTES, Raw, Tier, wait_until


def keys_for(n: int) -> list[str]:
    return [f"m@1@0@bfloat16@f{i:04d}" for i in range(n)]


@contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """SIGSTOP the server: it accepts connections (kernel backlog) but never answers."""
    assert server.process is not None
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)
    # The signal lands asynchronously: wait until the kernel reports the process stopped.
    wait_until(lambda: Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "T")
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def timed(call: Callable[[], int]) -> tuple[int, float]:
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


def test_unreachable_at_start_opens_the_breaker(make_tier: Callable[..., Tier]) -> None:
    tier = make_tier(f"redis://127.0.0.1:{free_port()}", remote_breaker_backoff_s=60)
    assert tier.backend.breaker.is_open
    assert tier.metrics.value("lmcache_remote_breaker_open") == 1
    [key] = keys_for(1)
    assert tier.backend.contains_prefix([key]) == 0
    assert tier.backend.load_prefix([key], [tier.empty()]) == 0
    tier.backend.submit(key, tier.buffer(CHUNK, 1), tier.done)
    assert tier.done_count == 1, "a write to an open breaker is released at once"
    assert tier.value("lmcache_dropped_writes_total") == 1


def test_frozen_server_costs_at_most_the_deadline(
    server: RedisServer, make_tier: Callable[..., Tier]
) -> None:
    tier = make_tier(
        server.url, remote_timeout_ms=50, remote_breaker_failures=3, remote_breaker_backoff_s=60
    )
    keys = keys_for(2)
    tier.write(keys, [tier.buffer(CHUNK, 1), tier.buffer(CHUNK, 2)])
    dest = [tier.empty(), tier.empty()]
    with frozen(server):
        for call in (
            lambda: tier.backend.contains_prefix(keys),
            lambda: tier.backend.load_prefix(keys, dest),
            lambda: tier.backend.contains_prefix(keys),
        ):
            found, took = timed(call)
            assert found == 0
            assert took < BOUND_S
        assert tier.backend.breaker.is_open
        assert tier.value("lmcache_tier_errors_total", op="lookup") == 2
        assert tier.value("lmcache_tier_errors_total", op="get") == 1
        assert tier.backend.contains_prefix(keys) == 0
        assert tier.value("lmcache_tier_errors_total", op="lookup") == 2, (
            "an open breaker skips the server: no third wait, no third error"
        )


def test_killed_then_restarted_server(server: RedisServer, make_tier: Callable[..., Tier]) -> None:
    tier = make_tier(server.url, remote_breaker_failures=2, remote_breaker_backoff_s=0.1)
    keys = keys_for(3)
    tier.write(keys[:1], [tier.buffer(CHUNK, 1)])
    server.kill()

    for _ in range(2):
        found, took = timed(lambda: tier.backend.contains_prefix(keys))
        assert found == 0 and took < BOUND_S
    assert tier.backend.breaker.is_open
    assert tier.metrics.value("lmcache_remote_breaker_open") == 1
    dropped = tier.value("lmcache_dropped_writes_total")
    tier.backend.submit(keys[1], tier.buffer(CHUNK, 2), tier.done)
    assert tier.value("lmcache_dropped_writes_total") == dropped + 1

    server.start()  # same port, empty (no persistence): a restarted pod of Valkey
    wait_until(lambda: not tier.backend.breaker.is_open)  # the writer's probe closed it
    assert tier.metrics.value("lmcache_remote_breaker_open") == 0
    tier.write(keys[1:], [tier.buffer(CHUNK, 3), tier.buffer(CHUNK, 4)])
    assert tier.backend.contains_prefix(keys[1:]) == 2
    assert tier.backend.load_prefix(keys[1:], [tier.empty(), tier.empty()]) == 2


def test_write_queue_is_bounded_and_releases_every_buffer(
    server: RedisServer, make_tier: Callable[..., Tier]
) -> None:
    """Writes never pin more than remote_write_queue_size of the pool; the rest are dropped
    (counted) and their buffers released at once."""
    tier = make_tier(server.url, slots=64, remote_write_queue_size=4 * CHUNK_BYTES / (1 << 30))
    keys = keys_for(50)
    buffers = [tier.buffer(CHUNK, i) for i in range(50)]
    with frozen(server):
        for key, buffer in zip(keys, buffers, strict=True):
            tier.backend.submit(key, buffer, tier.done)
        assert tier.value("lmcache_dropped_writes_total") == 46
        assert tier.done_count == 46
    assert tier.backend.flush(30)
    assert tier.done_count == 50
    assert tier.backend.contains_prefix(keys[:4]) == 4


def test_failing_server_leaks_nothing(server: RedisServer, make_tier: Callable[..., Tier]) -> None:
    """Hundreds of failed lookups, loads and writes (breaker kept closed so every one goes to
    the dead server): no memory growth, no thread growth, every buffer released."""
    tier = make_tier(server.url, remote_breaker_failures=1_000_000)
    keys = keys_for(4)
    dest = [tier.empty() for _ in keys]
    source = tier.buffer(CHUNK, 1)
    server.kill()

    def cycle(n: int) -> None:
        for _ in range(n):
            assert tier.backend.contains_prefix(keys) == 0
            assert tier.backend.load_prefix(keys, dest) == 0
            tier.backend.submit(keys[0], source, tier.done)
        assert tier.backend.flush(30)

    cycle(50)
    threads = threading.active_count()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    cycle(300)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert growth < 256 << 10, f"{growth} bytes retained by 300 failed cycles"
    assert threading.active_count() == threads
    assert tier.done_count == 350, "every submitted buffer was handed back"
    assert tier.value("lmcache_tier_errors_total", op="lookup") == 350


def test_full_server_with_noeviction_refuses_writes_countably(
    start_server: Callable[..., RedisServer],
    make_tier: Callable[..., Tier],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = start_server(None, "--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    tier = make_tier(server.url, slots=1100)
    keys = keys_for(1000)
    tier.write(keys, [tier.buffer(CHUNK, i) for i in range(1000)])
    refused = tier.value("lmcache_tier_errors_total", op="put")
    assert refused > 0
    assert tier.value("lmcache_dropped_writes_total") == refused
    assert tier.metrics.value("lmcache:num_remote_write_requests_total") == 1000 - refused
    assert caplog.text.count("refused a write") == 1, "warned once, not per batch"
    assert not tier.backend.breaker.is_open, "a full server is not a dead one"
    assert tier.backend.contains_prefix(keys) > 0


def test_full_server_with_lru_evicts_instead(
    start_server: Callable[..., RedisServer], make_tier: Callable[..., Tier]
) -> None:
    server = start_server(None, "--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru")
    tier = make_tier(server.url, slots=1100)
    keys = keys_for(1000)
    tier.write(keys, [tier.buffer(CHUNK, i) for i in range(1000)])
    assert tier.value("lmcache_tier_errors_total", op="put") == 0
    assert tier.metrics.value("lmcache:num_remote_write_requests_total") == 1000
    assert tier.backend.contains_prefix(keys[-1:]) == 1, "the newest chunk stays"
    assert int(Raw(server).client.dbsize()) < 1000, "older chunks were evicted"  # type: ignore[arg-type]


class GarbageServer:
    """A TCP server that answers every command with one fixed line: not a Redis, or a broken
    one (a real socket; there is no real server that sends malformed RESP on purpose)."""

    def __init__(self, reply: bytes) -> None:
        import socket

        self.reply = reply
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: object) -> None:
        import socket

        assert isinstance(conn, socket.socket)
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                # One reply per command in the pipeline (commands start with '*').
                conn.sendall(self.reply * max(1, data.count(b"\r\n*") + data.startswith(b"*")))

    def close(self) -> None:
        self._sock.close()


@pytest.mark.parametrize(
    "reply", [b":--5\r\n", b":1x\r\n", b"$99999999999999999999\r\n", b"*1\r\n"]
)
def test_malformed_replies_are_failures_and_the_probe_is_settled(
    make_tier: Callable[..., Tier], reply: bytes
) -> None:
    """Garbage where a number belongs is a remote failure (never a ValueError escaping); the
    breaker's probe, if it was the one, is settled so the tier is probed again later."""
    garbage = GarbageServer(reply)
    try:
        tier = make_tier(
            f"redis://127.0.0.1:{garbage.port}",
            remote_breaker_failures=1,
            remote_breaker_backoff_s=0.05,
        )
        keys = keys_for(2)
        assert tier.backend.contains_prefix(keys) == 0
        assert tier.backend.load_prefix(keys, [tier.empty(), tier.empty()]) == 0
        assert tier.backend.breaker.is_open
        before = tier.value("lmcache_tier_errors_total", op="lookup")

        def probed_by_a_lookup(times: int) -> Callable[[], bool]:
            # While open, a lookup reaches the server only as the breaker's probe: a probe
            # left unsettled by an escaping error would stop these from ever counting again.
            def check() -> bool:
                assert tier.backend.contains_prefix(keys) == 0
                return tier.value("lmcache_tier_errors_total", op="lookup") >= before + times

            return check

        wait_until(probed_by_a_lookup(1))
        wait_until(probed_by_a_lookup(3))
    finally:
        garbage.close()
