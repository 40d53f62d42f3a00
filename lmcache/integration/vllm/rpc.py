"""The scheduler asks every worker rank what it holds, and each rank pins what it answers.

Each worker rank serves a ROUTER socket named after the vLLM instance and its rank; the
scheduler holds one DEALER socket per rank, sends a request to all of them at once and waits
for every answer under one deadline. The same path serves TP=1 (scheduler and worker in one
process) and TP>1 (worker processes), so there is no in-process shortcut to keep in step.

Wire format: multipart frames of raw bytes and little-endian integers, never pickle.
Request: ``[seq u64, op, request id]`` plus, for a lookup, the chunks' ``(start, end)`` as
u32 pairs and their 32-hex-digit digests. Reply: ``[seq u64, ready u32, staging u8]``.
"""

from __future__ import annotations

import logging
import struct
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import zmq

from lmcache.keys import ChunkRange

logger = logging.getLogger("lmcache")

LOOKUP = b"L"
STATUS = b"S"
RELEASE = b"R"
_DIGEST = 32
_SEQ = struct.Struct("<Q")
_ANSWER = struct.Struct("<IB")

RETRY_AFTER_S = 30.0
"""After a rank left a request unanswered, answer misses without asking for this long, so an
unreachable rank costs one deadline per period, not one per request."""


def address(instance_id: str, rank: int) -> str:
    return f"ipc://{Path(tempfile.gettempdir()) / f'lmcache-{instance_id}-r{rank}.ipc'}"


@dataclass(frozen=True)
class Answer:
    """One rank's answer: ``ready`` chunks from the first asked are pinned for the request;
    ``staging``: more are being loaded from disk/remote into the pool (ask again)."""

    ready: int
    staging: bool


NO_ANSWER = Answer(0, False)


class Pins(Protocol):
    """What a rank does for the scheduler (the worker's pin table)."""

    def lookup(self, req_id: str, chunks: Sequence[ChunkRange]) -> Answer: ...

    def status(self, req_id: str) -> Answer: ...

    def release(self, req_id: str) -> None: ...


def encode_chunks(chunks: Sequence[ChunkRange]) -> bytes:
    bounds = struct.pack(f"<{2 * len(chunks)}I", *(x for c in chunks for x in (c.start, c.end)))
    return struct.pack("<I", len(chunks)) + bounds + "".join(c.key for c in chunks).encode()


def decode_chunks(data: bytes) -> list[ChunkRange]:
    (count,) = struct.unpack_from("<I", data)
    bounds = struct.unpack_from(f"<{2 * count}I", data, 4)
    digests = data[4 + 8 * count :].decode("ascii")
    if len(digests) != _DIGEST * count:
        raise ValueError("digest block does not match the chunk count")
    return [
        ChunkRange(bounds[2 * i], bounds[2 * i + 1], digests[_DIGEST * i : _DIGEST * (i + 1)])
        for i in range(count)
    ]


class RankServer:
    """Serves one rank's :class:`Pins` from a daemon thread until :meth:`close`."""

    def __init__(self, pins: Pins, instance_id: str, rank: int) -> None:
        self._pins = pins
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address(instance_id, rank))
        control = f"inproc://lmcache-rank-stop-{id(self)}"
        self._stop_rx = self._context.socket(zmq.PAIR)
        self._stop_rx.bind(control)
        self._stop_tx = self._context.socket(zmq.PAIR)
        self._stop_tx.connect(control)
        self._thread = threading.Thread(target=self._serve, name=f"lmcache-rank{rank}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._stop_rx, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._stop_rx in ready:
                break
            frames = self._socket.recv_multipart()
            peer, seq = frames[0], frames[1]
            try:
                answer = self._handle(frames[2:])
            except Exception:
                logger.exception("LMCache rank request failed; answering a miss")
                answer = NO_ANSWER
            self._socket.send_multipart([peer, seq, _ANSWER.pack(answer.ready, answer.staging)])
        for sock in (self._socket, self._stop_rx):
            sock.close(linger=0)

    def _handle(self, frames: list[bytes]) -> Answer:
        op, req_id = frames[0], frames[1].decode()
        if op == LOOKUP:
            return self._pins.lookup(req_id, decode_chunks(frames[2]))
        if op == STATUS:
            return self._pins.status(req_id)
        if op == RELEASE:
            self._pins.release(req_id)
            return NO_ANSWER
        raise ValueError(f"unknown op {op!r}")

    def close(self) -> None:
        self._stop_tx.send(b"")
        self._thread.join()
        self._stop_tx.close(linger=0)


class RankClient:
    """The scheduler's end: asks every rank, one request at a time, under a deadline."""

    def __init__(self, instance_id: str, world_size: int, timeout_ms: int) -> None:
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._addresses = [address(instance_id, rank) for rank in range(world_size)]
        self._timeout_ms = timeout_ms
        self._sockets = [self._connect(a) for a in self._addresses]
        self._seq = 0
        self._quiet_until = 0.0

    def _connect(self, addr: str) -> zmq.Socket[bytes]:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(addr)
        return sock

    def lookup(self, req_id: str, chunks: Sequence[ChunkRange]) -> list[Answer]:
        """Each rank pins the run of ``chunks`` it holds in CPU and stages what follows on
        its disk/remote tiers; a rank that does not answer in time counts as a miss."""
        return self._ask(LOOKUP, req_id, encode_chunks(chunks))

    def status(self, req_id: str) -> list[Answer]:
        return self._ask(STATUS, req_id)

    def release(self, req_id: str) -> None:
        """Unpin the request's chunks on every rank; done when this returns. While quiet it
        is sent without waiting: a rank that answered a lookup late may hold pins for it."""
        self._ask(RELEASE, req_id, wait=time.monotonic() >= self._quiet_until)

    def _ask(
        self, op: bytes, req_id: str, payload: bytes | None = None, wait: bool = True
    ) -> list[Answer]:
        if wait and time.monotonic() < self._quiet_until:
            return [NO_ANSWER] * len(self._sockets)
        self._seq += 1
        seq = _SEQ.pack(self._seq)
        frames = [seq, op, req_id.encode()] + ([payload] if payload is not None else [])
        for sock in self._sockets:
            sock.send_multipart(frames)
        if not wait:
            return [NO_ANSWER] * len(self._sockets)
        answers: list[Answer | None] = [None] * len(self._sockets)
        poller = zmq.Poller()
        for sock in self._sockets:
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + self._timeout_ms / 1000
        while any(a is None for a in answers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._unanswered(op, answers)
                break
            for sock, _ in poller.poll(max(1, int(remaining * 1000))):
                reply = sock.recv_multipart()
                if reply[0] != seq:
                    continue  # the late answer to an earlier, abandoned request
                ready, staging = _ANSWER.unpack(reply[1])
                answers[self._sockets.index(sock)] = Answer(ready, bool(staging))
        return [a if a is not None else NO_ANSWER for a in answers]

    def _unanswered(self, op: bytes, answers: list[Answer | None]) -> None:
        missing = [rank for rank, a in enumerate(answers) if a is None]
        logger.warning(
            "LMCache worker rank(s) %s did not answer within %d ms; lookups are misses for "
            "the next %.0f s",
            missing,
            self._timeout_ms,
            RETRY_AFTER_S,
        )
        self._quiet_until = time.monotonic() + RETRY_AFTER_S

    def close(self) -> None:
        for sock in self._sockets:
            sock.close(linger=0)
