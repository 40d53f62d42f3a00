"""The RESP reply reader on a real socket pair: malformed, hostile or silent peers are errors
(misses upstream), never exceptions of other kinds, unbounded buffers or hangs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from lmcache.storage.remote.client import (
    RemoteAuthError,
    RemoteError,
    ReplyReader,
    ServerReplyError,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def feed(sock: socket.socket, data: bytes) -> None:
    """Send from another thread: a socket pair's buffer is smaller than some replies."""
    threading.Thread(target=sock.sendall, args=(data,), daemon=True).start()


def reader(sock: socket.socket, budget: float = 1.0) -> ReplyReader:
    return ReplyReader(sock, time.monotonic() + budget)


def test_bulk_value_split_between_buffer_and_socket(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    payload = bytes(range(256)) * 1000
    feed(theirs, b"$%d\r\n" % len(payload) + payload + b"\r\n:1\r\n")
    r = reader(ours)
    assert r.bulk_length() == len(payload)
    dest = bytearray(len(payload))
    r.read_into(memoryview(dest))
    r.expect_crlf()
    assert bytes(dest) == payload
    assert r.integer() == 1
    r.finished = True
    assert r.clean


@pytest.mark.parametrize("garbage", [b"$abc\r\n", b":1.5\r\n", b"HTTP/1.1 400 Bad\r\n", b"\r\n"])
def test_malformed_replies_are_remote_errors(
    garbage: bytes, pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, theirs = pair
    feed(theirs, garbage)
    with pytest.raises(RemoteError, match="protocol error"):
        reader(ours).bulk_length()


def test_endless_line_is_refused_not_buffered(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    feed(theirs, b"+" + b"x" * (1 << 17))
    with pytest.raises(RemoteError, match="too long"):
        reader(ours).line()


def test_error_replies(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    feed(theirs, b"-OOM command not allowed\r\n-WRONGPASS invalid password\r\n")
    r = reader(ours)
    with pytest.raises(ServerReplyError, match="OOM"):
        r.reply_head()
    with pytest.raises(RemoteAuthError):
        r.reply_head()


def test_silent_peer_hits_the_deadline(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    with pytest.raises(RemoteError, match="deadline"):
        reader(ours, budget=0.05).integer()


def test_closed_peer(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(b"$10\r\nabc")
    theirs.close()
    r = reader(ours)
    assert r.bulk_length() == 10
    with pytest.raises(RemoteError, match="closed"):
        r.read_into(memoryview(bytearray(10)))
