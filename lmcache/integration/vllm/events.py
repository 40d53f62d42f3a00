"""KV events for KV-aware routers: what this rank's tiers hold, as vLLM's own event types.

A router (llm-d's inference scheduler, NVIDIA Dynamo's KV router) can send a request to the
pod that holds its prefix only if pods say what they hold. vLLM publishes its GPU cache as
``BlockStored`` / ``BlockRemoved`` events over ``--kv-events-config``; the same publisher
carries ours:

* ``BlockStored`` when a chunk lands in a tier of this pod (``medium`` "CPU" or "DISK"), with
  vLLM's own block hashes of the chunk's blocks (computed by vLLM with its
  ``--prefix-caching-hash-algo``, so a router hashes prompts the way it already does for
  vLLM's GPU events), the parent block's hash, the token ids and the LoRA adapter;
* ``BlockRemoved`` when the chunk has left every tier of this pod (``medium`` the last one).

A subscriber that adds the hashes of every stored event and drops those of every removed one
holds exactly the blocks this pod can load. Chunks on disk survive restarts: their event
description is kept in the file's header tag and announced again at start.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass

from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent

logger = logging.getLogger("lmcache")

MEDIUM = {"cpu": "CPU", "disk": "DISK"}
"""Our tier names -> the ``medium`` of their events (vLLM's GPU cache is "GPU")."""

Hash = int | bytes


@dataclass(frozen=True)
class ChunkEvent:
    """What a router needs to know of one chunk: its full vLLM blocks."""

    block_hashes: tuple[Hash, ...]
    parent: Hash | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    lora_name: str | None = None

    def stored(self, medium: str) -> BlockStored:
        return BlockStored(
            block_hashes=list(self.block_hashes),
            parent_block_hash=self.parent,
            token_ids=list(self.token_ids),
            block_size=self.block_size,
            lora_id=self.lora_id,
            medium=medium,
            lora_name=self.lora_name,
        )

    def encode(self) -> bytes:
        """JSON for a disk file's header tag (no pickle: the bytes come back from disk)."""
        return json.dumps(
            {
                "h": [_hash_out(h) for h in self.block_hashes],
                "p": None if self.parent is None else _hash_out(self.parent),
                "t": list(self.token_ids),
                "b": self.block_size,
                "i": self.lora_id,
                "l": self.lora_name,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, tag: bytes) -> ChunkEvent | None:
        """The description in a header tag; None for an untagged or unreadable one."""
        if not tag:
            return None
        try:
            data = json.loads(tag)
            event = cls(
                tuple(_hash_in(h) for h in data["h"]),
                None if data["p"] is None else _hash_in(data["p"]),
                tuple(int(t) for t in data["t"]),
                int(data["b"]),
                None if data["i"] is None else int(data["i"]),
                None if data["l"] is None else str(data["l"]),
            )
        except (ValueError, KeyError, TypeError):
            logger.warning("KV events: an unreadable chunk description was skipped")
            return None
        if len(event.token_ids) != len(event.block_hashes) * event.block_size:
            return None
        return event


def _hash_out(value: Hash) -> int | str:
    return value.hex() if isinstance(value, bytes) else value


def _hash_in(value: object) -> Hash:
    if isinstance(value, str):
        return bytes.fromhex(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError("a block hash is an int or a hex string")


class TierEvents:
    """Tracks where each described chunk is and queues the events of every change.

    Told by the storage tiers (``landed`` / ``left``) and by the worker (``describe``, before
    a chunk is published). Thread-safe: the disk writer and the rank server thread call in."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._described: dict[str, ChunkEvent] = {}
        self._where: dict[str, set[str]] = {}
        self._pending: list[KVCacheEvent] = []

    def describe(self, key: str, event: ChunkEvent) -> None:
        with self._lock:
            self._described.setdefault(key, event)

    def forget(self, key: str) -> None:
        """A described chunk that will not land (its store was aborted)."""
        with self._lock:
            if key not in self._where:
                self._described.pop(key, None)

    def tag(self, key: str) -> bytes:
        with self._lock:
            event = self._described.get(key)
        return event.encode() if event is not None else b""

    def landed(self, key: str, tier: str, tag: bytes = b"") -> None:
        medium = MEDIUM.get(tier)
        if medium is None:
            return  # the remote tier is shared by every pod: not this pod's to announce
        with self._lock:
            event = self._described.get(key)
            if event is None:
                event = ChunkEvent.decode(tag)
                if event is None:
                    return
                self._described[key] = event
            self._where.setdefault(key, set()).add(tier)
            self._pending.append(event.stored(medium))

    def left(self, key: str, tier: str) -> None:
        with self._lock:
            where = self._where.get(key)
            if where is None or tier not in where:
                return
            where.discard(tier)
            if where:
                return
            del self._where[key]
            event = self._described.pop(key)
            self._pending.append(BlockRemoved(list(event.block_hashes), MEDIUM[tier]))

    def settled(self, key: str) -> None:
        """A chunk's write-backs are over: a description no tier of this pod holds goes (a
        remote-only store, a failed or dropped disk write), else it would stay forever."""
        with self._lock:
            if key not in self._where:
                self._described.pop(key, None)

    def __len__(self) -> int:
        """Chunks described: landed in a tier of this pod, or on their way (tests)."""
        with self._lock:
            return len(self._described)

    def take(self) -> list[KVCacheEvent]:
        """The events since the last call, in order."""
        with self._lock:
            events, self._pending = self._pending, []
        return events
