"""What the scheduler-side connector tells every worker each step: small typed specs.

Only what changes in the step travels: the chunks a request loads or stores now (their digests,
computed once per request by the scheduler) and the blocks that hold their tokens, never a
request's whole prompt or block table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from lmcache.integration.vllm.events import ChunkEvent
from lmcache.keys import ChunkRange


@dataclass(frozen=True)
class BlockSpan:
    """The request's blocks ``first, first + 1, ...`` by index, with their vLLM block ids:
    enough to find the slot of any token in ``[first * block_size, ...)``."""

    first: int
    block_ids: tuple[int, ...]

    @classmethod
    def covering(cls, block_ids: list[int], block_size: int, start: int, end: int) -> BlockSpan:
        """The blocks holding tokens ``[start, end)`` of a request with ``block_ids``."""
        first, last = start // block_size, -(-end // block_size)
        return cls(first, tuple(block_ids[first:last]))

    def slots(self, block_size: int, start: int, end: int) -> torch.Tensor:
        """vLLM slot ids of tokens ``[start, end)``: ``block_id * block_size + offset``."""
        blocks = torch.tensor(self.block_ids, dtype=torch.long)
        offsets = torch.arange(block_size, dtype=torch.long)
        slots = (blocks[:, None] * block_size + offsets[None, :]).flatten()
        base = self.first * block_size
        return slots[start - base : end - base]

    def blocks_from(self, block_size: int, start: int, end: int) -> set[int]:
        """Block ids holding any of tokens ``[start, end)``."""
        lo, hi = start // block_size - self.first, -(-end // block_size) - self.first
        return set(self.block_ids[max(lo, 0) : hi])


@dataclass(frozen=True)
class LoadSpec:
    """Write tokens ``[start, end)`` of a request from the chunks it pinned at lookup.

    ``chunks`` are the pinned chunks that hold those tokens, in order (digests, not keys:
    each rank turns them into its own keys)."""

    req_id: str
    chunks: tuple[ChunkRange, ...]
    start: int
    end: int
    blocks: BlockSpan


@dataclass(frozen=True)
class StoreSpec:
    """Store these chunks of a request, whose tokens this step's forward pass computed (or
    vLLM's prefix cache holds). ``total_tokens``: the request's tokens computed so far (the
    seed's "Storing KV cache for N out of M tokens")."""

    req_id: str
    chunks: tuple[ChunkRange, ...]
    blocks: BlockSpan
    total_tokens: int
    events: tuple[ChunkEvent | None, ...] = ()
    """With KV events on: each chunk's vLLM blocks, as routers know them."""


@dataclass
class LMCacheConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    """Requests whose blocks vLLM freed: stores still reading them must finish before this
    step's forward pass writes other requests' KV there."""
