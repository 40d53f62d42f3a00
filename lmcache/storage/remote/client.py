"""The wire: a valkey connection pool plus a pipelined RESP data path with deadlines.

The ``valkey`` package owns connections (URL forms, TLS, AUTH/SELECT handshake, pooling,
connect timeouts). Its reply parser, though, buffers a 32 MiB bulk string through ``BytesIO``
and copies it twice (~80 ms per GET here, slower when pipelined), so replies are read here
instead: bulk values are ``recv_into`` the caller's destination (a pool slot) and values are
sent as ``memoryview``s of the slot, so KV bytes are never copied in Python. Every operation
has a time budget that starts once it holds a connected socket (connecting is bounded on its
own by the connect and socket timeouts) and is enforced on every socket wait. There is no
separate silence limit: the server builds all replies of a pipeline before sending the first
byte (~10 ms per 32 MiB value here).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import valkey
from valkey.connection import AbstractConnection
from valkey.exceptions import AuthenticationError, ValkeyError

from lmcache.storage.remote.url import RemoteTarget

_CRLF = b"\r\n"
_READ_SIZE = 1 << 16
_AUTH_ERRORS = ("NOAUTH", "WRONGPASS", "NOPERM")
_MAX_LINE = 1 << 16


class RemoteError(Exception):
    """The server is unreachable, too slow, or answered with an error (never a miss)."""


class RemoteAuthError(RemoteError):
    """The server refused our credentials: a configuration problem, not an outage."""


class ServerReplyError(RemoteError):
    """An ``-ERR``-style reply (e.g. OOM, READONLY)."""


@dataclass(frozen=True)
class WriteItem:
    """One SET: the value is ``header`` followed by ``payload`` (a view of a pool slot)."""

    key: str
    header: bytes
    payload: memoryview


class ReplyReader:
    """Reads RESP2 replies from one socket, each wait bounded by the operation's deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self.deadline = deadline
        self._buf = bytearray()
        self._pos = 0
        self._scratch = bytearray(_READ_SIZE)
        self.finished = False
        """Set once every reply of the operation has been read in full."""

    @property
    def clean(self) -> bool:
        """Finished with nothing extra buffered: the connection can serve another command."""
        return self.finished and self._pos == len(self._buf)

    def _recv_into(self, view: memoryview) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise RemoteError("deadline exceeded waiting for the server")
        self._sock.settimeout(remaining)
        try:
            got = self._sock.recv_into(view)
        except TimeoutError:
            raise RemoteError("deadline exceeded waiting for the server") from None
        except OSError as err:
            raise RemoteError(f"connection lost: {err}") from None
        if got == 0:
            raise RemoteError("connection closed by the server")
        return got

    def _fill(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        got = self._recv_into(memoryview(self._scratch))
        self._buf += memoryview(self._scratch)[:got]

    def line(self) -> bytes:
        while True:
            end = self._buf.find(_CRLF, self._pos)
            if end >= 0:
                out = bytes(self._buf[self._pos : end])
                self._pos = end + 2
                return out
            if len(self._buf) - self._pos > _MAX_LINE:
                raise RemoteError("protocol error: reply line too long (not a RESP server?)")
            self._fill()

    def read_into(self, dest: memoryview) -> None:
        """Fill ``dest`` exactly: buffered bytes first, then straight from the socket."""
        done = min(len(dest), len(self._buf) - self._pos)
        dest[:done] = self._buf[self._pos : self._pos + done]
        self._pos += done
        while done < len(dest):
            done += self._recv_into(dest[done:])

    def read(self, size: int) -> bytes:
        out = bytearray(size)
        self.read_into(memoryview(out))
        return bytes(out)

    def expect_crlf(self) -> None:
        if self.read(2) != _CRLF:
            raise RemoteError("protocol error: bulk string not terminated by CRLF")

    def reply_head(self) -> tuple[str, bytes]:
        """The type byte and the rest of a reply's first line; raises on an error reply."""
        head = self.line()
        if not head:
            raise RemoteError("protocol error: empty reply line")
        kind, rest = chr(head[0]), head[1:]
        if kind == "-":
            message = rest.decode(errors="replace")
            if message.startswith(_AUTH_ERRORS):
                raise RemoteAuthError(message)
            raise ServerReplyError(message)
        return kind, rest

    def integer(self) -> int:
        return self._number(":")

    def bulk_length(self) -> int:
        """Length of the bulk string that follows, or -1 for a missing key."""
        return self._number("$")

    def _number(self, expected: str) -> int:
        kind, rest = self.reply_head()
        digits = rest[1:] if rest.startswith(b"-") else rest
        if kind != expected or not digits.isdigit() or len(digits) > 18:
            raise RemoteError(
                f"protocol error: expected {expected}<number>, got {kind}{rest[:40]!r}"
            )
        return int(rest)


def _bulks(*args: bytes | str) -> bytes:
    out = []
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _command(*args: bytes | str) -> bytes:
    return b"*%d\r\n%s" % (len(args), _bulks(*args))


Consumer = Callable[[int, int, ReplyReader], bool]


class RemoteClient:
    """A bounded pool of connections to one server and the pipelined commands the tier needs."""

    def __init__(self, target: RemoteTarget, timeout_s: float, max_connections: int) -> None:
        self.target = target
        self._pool = valkey.BlockingConnectionPool(
            max_connections=max_connections,
            timeout=timeout_s,
            **target.connection_kwargs(timeout_s),
        )

    @contextmanager
    def connection(self, budget_s: float) -> Iterator[tuple[AbstractConnection, ReplyReader]]:
        """A connected connection and a reader whose deadline is ``budget_s`` from now; the
        connection is dropped (not reused) unless every reply was read, so a later command
        never reads a stale reply."""
        try:
            conn = self._pool.get_connection("GET")
        except AuthenticationError as err:
            raise RemoteAuthError(str(err)) from None
        except (ValkeyError, OSError) as err:
            raise RemoteError(f"cannot connect: {err}") from None
        sock: Any = conn._sock  # the connected socket; valkey has no public accessor
        reader = ReplyReader(sock, time.monotonic() + budget_s)
        try:
            yield conn, reader
        finally:
            if not reader.clean:
                conn.disconnect()
            self._pool.release(conn)

    def send(
        self, conn: AbstractConnection, reader: ReplyReader, parts: Sequence[bytes | memoryview]
    ) -> None:
        remaining = reader.deadline - time.monotonic()
        if remaining <= 0:
            raise RemoteError("deadline exceeded before sending")
        conn._sock.settimeout(remaining)  # type: ignore[union-attr]
        try:
            conn.send_packed_command(list(parts), check_health=False)
        except (ValkeyError, OSError) as err:
            raise RemoteError(f"send failed: {err}") from None

    def ping(self, budget_s: float) -> None:
        with self.connection(budget_s) as (conn, reader):
            self.send(conn, reader, [_command("PING")])
            reply = reader.reply_head()
            if reply != ("+", b"PONG"):
                raise RemoteError(f"unexpected PING reply {reply!r}")
            reader.finished = True

    def exists(self, keys: Sequence[str], budget_s: float) -> list[bool]:
        """Per-key existence, all keys in one round trip."""
        with self.connection(budget_s) as (conn, reader):
            self.send(conn, reader, [b"".join(_command("EXISTS", k) for k in keys)])
            found = [reader.integer() == 1 for _ in keys]
            reader.finished = True
            return found

    def get_each(self, keys: Sequence[str], budget_s: float, consume: Consumer) -> None:
        """Pipelined GETs, one round trip; ``consume(i, length, reader)`` reads reply ``i``
        (length -1 = missing key) in full and returns whether to go on. Raising or stopping
        early drops the connection, so unread replies never reach another command."""
        with self.connection(budget_s) as (conn, reader):
            self.send(conn, reader, [b"".join(_command("GET", k) for k in keys)])
            for i in range(len(keys)):
                if not consume(i, reader.bulk_length(), reader):
                    reader.finished = i == len(keys) - 1
                    return
            reader.finished = True

    def set_many(
        self, items: Iterable[WriteItem], ttl_s: int | None, budget_s: float
    ) -> list[str | None]:
        """Pipelined SETs (with ``EX`` when ``ttl_s``), one round trip; each item is sent as
        soon as ``items`` yields it, so the caller can prepare the next one meanwhile.
        Returns per item None or the server's error."""
        tail = b"\r\n" if ttl_s is None else b"\r\n" + _bulks("EX", str(ttl_s))
        nargs = 3 if ttl_s is None else 5
        with self.connection(budget_s) as (conn, reader):
            sent = 0
            for item in items:
                key = item.key.encode()
                head = b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s" % (
                    nargs,
                    len(key),
                    key,
                    len(item.header) + len(item.payload),
                    item.header,
                )
                self.send(conn, reader, [head, item.payload, tail])
                sent += 1
            results: list[str | None] = []
            for _ in range(sent):
                try:
                    reader.reply_head()
                    results.append(None)
                except ServerReplyError as err:
                    results.append(str(err))
            reader.finished = True
            return results

    def delete(self, key: str, budget_s: float) -> None:
        with self.connection(budget_s) as (conn, reader):
            self.send(conn, reader, [_command("DEL", key)])
            reader.integer()
            reader.finished = True

    def close(self) -> None:
        self._pool.disconnect()
