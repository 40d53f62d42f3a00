"""KV events through vLLM's own publisher, decoded as a router would.

The rig's scheduler runs vLLM's real ZMQ event publisher (``--kv-events-config``); the test
fetches every batch it published (its replay socket) and decodes them with vLLM's msgspec
types. Replaying the CPU/DISK events into a set of block hashes must give exactly the blocks
the engine holds, through stores, evictions and a restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
)
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from lmcache.config import ConfigError
from lmcache.integration.vllm import settings
from lmcache.storage.remote.devserver import free_port
from tests.vllm.conftest import BLOCK, CHUNK, HEAD_SIZE, HEADS, LAYERS, Rig, RigFactory
from tests.vllm.test_scheduler import prompt

OURS = ("CPU", "DISK")
CHUNK_GB = CHUNK * LAYERS * 2 * HEADS * HEAD_SIZE * 4 / (1 << 30)


class Subscriber:
    """What a router sees: every batch vLLM published, replayed from the first."""

    def __init__(self, replay: str) -> None:
        self._replay = replay

    def batches(self, rig: Rig) -> list[KVEventBatch]:
        publisher = rig.scheduler.kv_event_publisher
        publisher._event_queue.join()  # everything handed to the publisher is on the wire
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = context.socket(zmq.DEALER)
        sock.connect(self._replay)
        try:
            sock.send_multipart([b"", (0).to_bytes(8, "big")])  # replay from the first batch
            decoder = msgspec.msgpack.Decoder(KVEventBatch)
            out = []
            while True:
                assert sock.poll(10_000), "the publisher did not answer the replay request"
                seq, payload = sock.recv_multipart()[-2:]  # (topic,) seq, payload
                if int.from_bytes(seq, "big", signed=True) == -1:
                    return out
                out.append(decoder.decode(payload))
        finally:
            sock.close(linger=0)

    def held(self, rig: Rig) -> set[int | bytes]:
        """The blocks our tiers announced and did not take back."""
        held: set[int | bytes] = set()
        for batch in self.batches(rig):
            for event in batch.events:
                if isinstance(event, BlockStored) and event.medium in OURS:
                    held.update(event.block_hashes)
                elif isinstance(event, BlockRemoved) and event.medium in OURS:
                    held.difference_update(event.block_hashes)
                elif isinstance(event, AllBlocksCleared):
                    held.clear()
        return held


@pytest.fixture
def events() -> Iterator[tuple[tuple[str, str], Subscriber]]:
    endpoints = (f"tcp://*:{free_port()}", f"tcp://*:{free_port()}")
    yield endpoints, Subscriber(endpoints[1].replace("*", "127.0.0.1"))


def engine_blocks(rig: Rig, prompts: list[list[int]], tiers: tuple[str, ...] = ("cpu",)) -> set:
    """vLLM's block hashes of the full blocks of every chunk the engine holds."""
    engine = rig.engine
    disk = next((t for t in engine.storage.lower if t.name == "disk"), None)
    held: set[int | bytes] = set()
    for tokens in prompts:
        hashes = [maybe_convert_block_hash(h) for h in rig.make_request("x", tokens).block_hashes]
        for chunk in engine.chunks(tokens):
            in_cpu = "cpu" in tiers and chunk.key in engine.storage.cpu
            on_disk = "disk" in tiers and disk is not None and disk.contains_prefix([chunk.key])
            if in_cpu or on_disk:
                held.update(hashes[chunk.start // BLOCK : chunk.end // BLOCK])
    return held


MODULE = {
    "connector": "LMCacheKubeConnectorV1",
    "module_path": "lmcache.integration.vllm.connector",
}


def test_a_router_rebuilds_what_the_cpu_tier_holds(
    rig_factory: RigFactory, events: tuple[tuple[str, str], Subscriber]
) -> None:
    endpoints, subscriber = events
    rig = rig_factory({"lmcache.max_local_cpu_size": 10 * CHUNK_GB}, kv_events=endpoints, **MODULE)
    prompts = [prompt(4 * CHUNK, seed=s) for s in range(4)]  # 16 chunks into 10 slots
    for i, tokens in enumerate(prompts):
        rig.add(f"r{i}", tokens)
        rig.run()
    held = subscriber.held(rig)
    expected = engine_blocks(rig, prompts)
    assert held == expected
    assert 0 < len(held) < 4 * 4 * CHUNK // BLOCK, "some chunks were evicted and taken back"
    removed = [
        e
        for b in subscriber.batches(rig)
        for e in b.events
        if isinstance(e, BlockRemoved) and e.medium == "CPU"
    ]
    assert removed, "evictions are published"


def test_disk_chunks_are_announced_again_after_a_restart(
    rig_factory: RigFactory, events: tuple[tuple[str, str], Subscriber], tmp_path: Path
) -> None:
    endpoints, subscriber = events
    disk = {"lmcache.local_disk": str(tmp_path), "lmcache.max_local_disk_size": 0.01}
    first = rig_factory(disk, kv_events=endpoints, **MODULE)
    tokens = prompt(3 * CHUNK)
    first.add("r1", tokens)
    first.run()
    assert first.engine.flush(timeout=30)
    first.add("r2", prompt(CHUNK, seed=7))  # a step after the write-back, to publish it
    first.run()
    media = {e.medium for b in subscriber.batches(first) for e in b.events if hasattr(e, "medium")}
    assert {"CPU", "DISK"} <= media
    first.close_worker()
    first.scheduler.shutdown()

    endpoints2 = (f"tcp://*:{free_port()}", f"tcp://*:{free_port()}")
    second = rig_factory(disk, kv_events=endpoints2, **MODULE)
    second.add("r3", prompt(CHUNK, seed=9))  # any step publishes what start-up announced
    second.run()
    again = Subscriber(endpoints2[1].replace("*", "127.0.0.1"))
    assert engine_blocks(second, [tokens], ("disk",)) <= again.held(second)
    assert len(engine_blocks(second, [tokens], ("disk",))) == 3 * CHUNK // BLOCK


@pytest.mark.parametrize("local_cpu", [True, False], ids=["cpu-and-disk", "disk-only"])
def test_descriptions_go_with_the_chunks(
    rig_factory: RigFactory,
    events: tuple[tuple[str, str], Subscriber],
    tmp_path: Path,
    local_cpu: bool,
) -> None:
    """What a chunk's events need is kept while a tier of this pod holds it, and no longer:
    chunks whose disk writes are dropped (a tier too small for one chunk) and that no CPU
    cache holds leave nothing behind, in a server that runs for months."""
    endpoints, _ = events
    tiny_disk = {"lmcache.local_disk": str(tmp_path), "lmcache.max_local_disk_size": 1e-6}
    config = {**tiny_disk, "lmcache.local_cpu": local_cpu}
    rig = rig_factory(config, kv_events=endpoints, **MODULE)
    tokens = prompt(3 * CHUNK)
    rig.add("r1", tokens)
    rig.run()
    assert rig.engine.flush(timeout=30)
    assert rig.engine.metrics.value("lmcache_dropped_writes_total", tier="disk") == 3
    tier_events = rig.connector.events
    assert tier_events is not None
    assert len(tier_events) == (3 if local_cpu else 0)


def test_vllms_own_wrapper_carries_stores_only(
    rig_factory: RigFactory, events: tuple[tuple[str, str], Subscriber]
) -> None:
    endpoints, subscriber = events
    rig = rig_factory({"lmcache.max_local_cpu_size": 2 * CHUNK_GB}, kv_events=endpoints)
    rig.add("r1", prompt(4 * CHUNK))  # more chunks than slots: some are evicted
    rig.run()
    ours = [
        e for b in subscriber.batches(rig) for e in b.events if getattr(e, "medium", "") in OURS
    ]
    assert ours and all(isinstance(e, BlockStored) for e in ours)


def test_chunks_must_be_whole_blocks_when_events_are_on(
    rig_factory: RigFactory, events: tuple[tuple[str, str], Subscriber]
) -> None:
    endpoints, _ = events
    with pytest.raises(ConfigError, match=r"chunk_size: 24 is not a multiple of vLLM's block"):
        rig_factory({"lmcache.chunk_size": 24}, kv_events=endpoints)


def test_only_rank_0_reports_events(
    rig_factory: RigFactory,
    events: tuple[tuple[str, str], Subscriber],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vLLM passes on an event only when every rank reporting in a step sent it: ranks whose
    chunks land in different steps would see events sent twice or dropped, so one speaks."""
    endpoints, _ = events
    monkeypatch.setattr(settings, "shard", lambda _config: (1, 2))  # this worker is rank 1 of 2
    rig = rig_factory(kv_events=endpoints, **MODULE)
    assert rig.connector.rank == 1
    assert rig.connector.events is None and rig.connector.take_events() == []
