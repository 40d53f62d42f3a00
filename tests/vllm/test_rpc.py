"""The scheduler-to-rank sockets: every rank asked at once, one deadline, stale answers
dropped, releases delivered. The ranks here serve a recording stand-in for the pin table (the
real one is exercised by every rig test); sockets, threads and encoding are the real ones."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence

import pytest
import zmq

from lmcache.integration.vllm import rpc
from lmcache.integration.vllm.rpc import Answer, RankClient, RankServer
from lmcache.keys import ChunkRange, chunk_digests
from tests.remote.conftest import wait_until


class Recorder:
    """Answers ``ready`` = the number of chunks asked about, minus ``short``; records calls;
    ``gate`` (when set) holds lookups until released."""

    def __init__(self, short: int = 0) -> None:
        self.short = short
        self.calls: list[tuple[str, str, int]] = []
        self.gate: threading.Event | None = None

    def lookup(self, req_id: str, chunks: Sequence[ChunkRange]) -> Answer:
        if self.gate is not None:
            self.gate.wait(30)
        self.calls.append(("lookup", req_id, len(chunks)))
        return Answer(max(0, len(chunks) - self.short), False)

    def status(self, req_id: str) -> Answer:
        self.calls.append(("status", req_id, 0))
        return Answer(1, True)

    def release(self, req_id: str) -> None:
        self.calls.append(("release", req_id, 0))


@pytest.fixture
def instance() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def two_ranks(instance: str) -> Iterator[list[Recorder]]:
    recorders = [Recorder(), Recorder(short=2)]
    servers = [RankServer(r, instance, rank) for rank, r in enumerate(recorders)]
    yield recorders
    for server in servers:
        server.close()


CHUNKS = chunk_digests(list(range(100)), 16, include_partial=True)


def test_every_rank_answers_for_itself(instance: str, two_ranks: list[Recorder]) -> None:
    client = RankClient(instance, world_size=2, timeout_ms=5000)
    try:
        assert client.lookup("r1", CHUNKS) == [Answer(7, False), Answer(5, False)]
        assert client.status("r1") == [Answer(1, True)] * 2
        client.release("r1")
    finally:
        client.close()
    for recorder in two_ranks:
        assert recorder.calls == [("lookup", "r1", 7), ("status", "r1", 0), ("release", "r1", 0)]


def test_chunks_survive_the_wire() -> None:
    assert rpc.decode_chunks(rpc.encode_chunks(CHUNKS)) == CHUNKS
    with pytest.raises(ValueError, match="digest block"):
        rpc.decode_chunks(rpc.encode_chunks(CHUNKS)[:-3])


def test_a_silent_rank_is_a_miss_then_quiet_and_its_late_answer_is_dropped(
    instance: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rpc, "RETRY_AFTER_S", 0.0)
    slow = Recorder()
    slow.gate = threading.Event()
    server = RankServer(slow, instance, 0)
    client = RankClient(instance, world_size=1, timeout_ms=200)
    try:
        assert client.lookup("r1", CHUNKS) == [rpc.NO_ANSWER], "late: a miss after the deadline"
        slow.gate.set()  # the rank answers the abandoned request now
        assert client.lookup("r2", CHUNKS[:3]) == [Answer(3, False)], "not r1's late answer"
    finally:
        client.close()
        server.close()


def test_while_quiet_lookups_are_misses_but_releases_still_go(
    instance: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rpc, "RETRY_AFTER_S", 3600.0)
    client = RankClient(instance, world_size=1, timeout_ms=100)
    try:
        assert client.lookup("r1", CHUNKS) == [rpc.NO_ANSWER]  # no rank up yet
        recorder = Recorder()
        server = RankServer(recorder, instance, 0)
        try:
            assert client.lookup("r2", CHUNKS) == [rpc.NO_ANSWER], "quiet: not asked"
            client.release("r1")
            wait_until(lambda: ("release", "r1", 0) in recorder.calls)
            # The unanswered lookup was delivered once the rank came up, and pinned for r1:
            # the release that follows it is what frees those pins.
            assert recorder.calls == [("lookup", "r1", 7), ("release", "r1", 0)]
        finally:
            server.close()
    finally:
        client.close()


def test_garbage_frames_get_a_miss_and_the_server_keeps_serving(instance: str) -> None:
    recorder = Recorder()
    server = RankServer(recorder, instance, 0)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    raw = context.socket(zmq.DEALER)
    raw.connect(rpc.address(instance, 0))
    client = RankClient(instance, world_size=1, timeout_ms=5000)
    try:
        for frames in ([b"\x01" * 8, b"X", b"r"], [b"\x02" * 8, rpc.LOOKUP, b"r", b"\xff" * 9]):
            raw.send_multipart(frames)
            assert raw.poll(5000)
            assert raw.recv_multipart()[1:] == [b"\x00\x00\x00\x00\x00"]
        assert client.lookup("ok", CHUNKS[:2]) == [Answer(2, False)]
    finally:
        raw.close(linger=0)
        client.close()
        server.close()
