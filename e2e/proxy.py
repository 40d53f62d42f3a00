"""A TCP proxy in front of the API server that can freeze: the network failure a timeout exists for.

Frozen, it keeps every connection open and forwards nothing, in either direction, and accepts
new connections without forwarding them either: a half-open connection, as a dead load balancer
or a partitioned node gives, where no error ever arrives. Thawed, new connections work again,
while the ones frozen stay silent forever: only a client with deadlines recovers from them.
TLS passes through untouched (the API server's certificate names 127.0.0.1).
"""

from __future__ import annotations

import selectors
import socket
import threading
from types import TracebackType


class FreezableProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._frozen = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def freeze(self) -> None:
        self._frozen.set()

    def thaw(self) -> None:
        """New connections are forwarded again; connections frozen so far stay dead."""
        self._frozen.clear()

    def __enter__(self) -> FreezableProxy:
        self._threads[0].start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
            frozen_at_birth = self._frozen.is_set()
            thread = threading.Thread(
                target=self._pump, args=(client, frozen_at_birth), daemon=True
            )
            thread.start()

    def _pump(self, client: socket.socket, frozen_at_birth: bool) -> None:
        """Forward both ways until either side closes; once frozen, never again."""
        if frozen_at_birth:
            return  # accepted, never forwarded: the client waits for an answer that never comes
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        with self._lock:
            self._sockets.append(upstream)
        peer = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as sel:
            sel.register(client, selectors.EVENT_READ)
            sel.register(upstream, selectors.EVENT_READ)
            while not self._stop.is_set():
                if self._frozen.is_set():
                    return  # both sockets stay open and silent
                for key, _ in sel.select(timeout=0.2):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data or self._frozen.is_set():
                        if not data:
                            client.close()
                            upstream.close()
                        return
                    try:
                        peer[sock].sendall(data)
                    except OSError:
                        return
