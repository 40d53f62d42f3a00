"""What the scheduler-side connector tells the workers each step (plain, picklable data)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True)
class LoadSpec:
    """Load tokens ``[start, end)``; the cached prefix the lookup found is ``tokens[:hit]``
    (chunk keys are computed over it, so ``end`` may stop short of a chunk boundary)."""

    start: int
    end: int
    hit: int


@dataclass(frozen=True)
class RequestOp:
    """One request's KV work this step: a load before the forward, a store after it."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    load: LoadSpec | None = None
    store_skip: int = 0
    store_end: int | None = None
    """Store the chunks of ``token_ids[:store_end]`` starting at or after ``store_skip``;
    None = no store this step."""

    def slots(self, block_size: int, end: int) -> torch.Tensor:
        """vLLM slot ids of tokens ``[0, end)``: ``block_id * block_size + offset``."""
        blocks = torch.tensor(self.block_ids[: -(-end // block_size)], dtype=torch.long)
        offsets = torch.arange(block_size, dtype=torch.long)
        return (blocks[:, None] * block_size + offsets[None, :]).flatten()[:end]

    def blocks_from(self, block_size: int, start: int, end: int) -> set[int]:
        """Block ids holding any of tokens ``[start, end)``."""
        return set(self.block_ids[start // block_size : -(-end // block_size)])


@dataclass
class LMCacheConnectorMetadata(KVConnectorMetadata):
    requests: list[RequestOp] = field(default_factory=list)
