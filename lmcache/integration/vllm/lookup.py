"""Answering "how many prompt tokens are cached" for a scheduler without an engine of its own.

With tensor parallelism (or any multiprocess executor) the workers, and so the engines, live
in other processes than the scheduler. Worker rank 0 then serves lookups on a unix socket
named after the vLLM instance; the scheduler asks it. Rank 0's answer stands for every rank:
if another rank misses a chunk at load time, that rank reports the blocks as load errors and
vLLM recomputes them. The wire format is raw little-endian integers, never pickle.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from lmcache.engine import LMCacheEngine
from lmcache.keys import Tokens, as_token_bytes

logger = logging.getLogger("lmcache")

LOOKUP_TIMEOUT_MS = 5000
"""A lookup not answered within this is a miss (the worker may be busy starting up)."""
RETRY_AFTER_S = 30.0
"""After an unanswered lookup, answer misses without asking for this long, so an unreachable
rank 0 (e.g. on another node) costs one timeout per period, not one per request."""


def lookup_address(instance_id: str) -> str:
    return f"ipc://{Path(tempfile.gettempdir()) / f'lmcache-lookup-{instance_id}.ipc'}"


class LookupServer:
    """Serves ``engine.lookup`` on the instance's socket from a daemon thread."""

    def __init__(self, engine: LMCacheEngine, instance_id: str) -> None:
        self._engine = engine
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._context.socket(zmq.REP)
        self._socket.bind(lookup_address(instance_id))
        control = f"inproc://lmcache-lookup-stop-{id(self)}"
        self._stop_rx = self._context.socket(zmq.PAIR)
        self._stop_rx.bind(control)
        self._stop_tx = self._context.socket(zmq.PAIR)
        self._stop_tx.connect(control)
        self._thread = threading.Thread(target=self._serve, name="lmcache-lookup", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._stop_rx, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._stop_rx in ready:
                break
            request = self._socket.recv()
            try:
                tokens = np.frombuffer(request, dtype="<u4")
                hit = self._engine.lookup(tokens)
            except Exception:
                logger.exception("lookup of %d bytes failed; answering a miss", len(request))
                hit = 0
            self._socket.send(int(hit).to_bytes(8, "little"))
        for sock in (self._socket, self._stop_rx):
            sock.close(linger=0)

    def close(self) -> None:
        self._stop_tx.send(b"")
        self._thread.join()
        self._stop_tx.close(linger=0)


class LookupClient:
    """The scheduler's end: one request at a time, a timeout counts as a miss."""

    def __init__(self, instance_id: str) -> None:
        self._address = lookup_address(instance_id)
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._connect()
        self._quiet_until = 0.0

    def _connect(self) -> zmq.Socket:
        sock = self._context.socket(zmq.REQ)
        sock.setsockopt(zmq.RCVTIMEO, LOOKUP_TIMEOUT_MS)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self._address)
        return sock

    def lookup(self, tokens: Tokens) -> int:
        if time.monotonic() < self._quiet_until:
            return 0
        self._socket.send(as_token_bytes(tokens))
        try:
            reply = self._socket.recv()
        except zmq.Again:
            logger.warning(
                "no lookup answer from worker rank 0 at %s within %d ms; lookups are misses "
                "for the next %.0f s",
                self._address,
                LOOKUP_TIMEOUT_MS,
                RETRY_AFTER_S,
            )
            self._socket.close()
            self._socket = self._connect()
            self._quiet_until = time.monotonic() + RETRY_AFTER_S
            return 0
        return int.from_bytes(reply, "little")

    def close(self) -> None:
        self._socket.close()
