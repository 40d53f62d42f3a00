"""Chunk keys: a chained hash over the whole token prefix.

Keys must be identical across processes, hosts and restarts so that another pod, a restarted
pod or Valkey can hit: Python's seeded ``hash()`` is never used. Each chunk's digest is the
xxh3-128 of every token from the start of the prompt to that chunk's end, so a key names the
entire prefix.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import xxhash

Tokens = Sequence[int] | np.ndarray | torch.Tensor


class ChunkRange(NamedTuple):
    """Tokens ``[start, end)`` of a prompt and the key of the prefix ending at ``end``.

    A NamedTuple, not a dataclass: a 128k-token lookup builds 512 of these and frozen
    dataclasses cost several times more to construct."""

    start: int
    end: int
    key: str

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class KeyScheme:
    """Everything besides the tokens that makes KV reusable: model, TP shard and dtype."""

    model_name: str
    world_size: int
    rank: int
    dtype_name: str
    chunk_size: int

    @property
    def prefix(self) -> str:
        """Everything a key depends on besides the tokens. ``chunk_size`` is part of it: with
        another chunk size the same token prefix ends a chunk of another length."""
        return (
            f"{self.model_name}@{self.world_size}@{self.rank}@{self.dtype_name}@{self.chunk_size}@"
        )

    @property
    def shard_name(self) -> str:
        """A file-system-safe name for this engine's share of a local disk."""
        return (
            f"rank{self.rank}-of-{self.world_size}-{xxhash.xxh3_64_hexdigest(self.prefix.encode())}"
        )

    def chunks(self, tokens: Tokens, include_partial: bool) -> list[ChunkRange]:
        """Chunk ranges with keys; the trailing partial chunk only if ``include_partial``."""
        data = as_token_bytes(tokens)
        num_tokens = len(data) // 4
        step = self.chunk_size
        limit = num_tokens if include_partial else num_tokens - num_tokens % step
        # One streaming xxh3-128 state over the whole prompt: the digest after each chunk
        # hashes the entire prefix, in O(n) total and without copying any chunk.
        state = xxhash.xxh3_128()
        view = memoryview(data)
        prefix = self.prefix
        out: list[ChunkRange] = []
        for start in range(0, limit, step):
            end = min(start + step, limit)
            state.update(view[start * 4 : end * 4])
            out.append(ChunkRange(start, end, prefix + state.hexdigest()))
        return out


def as_token_bytes(tokens: Tokens) -> bytes:
    """Token ids as little-endian uint32 bytes: one fixed encoding for every input type."""
    if isinstance(tokens, list):  # vLLM's prompt_token_ids; array() is 3x faster than numpy here
        packed = array.array("I", tokens)
        if sys.byteorder == "big":
            packed.byteswap()
        return packed.tobytes()
    ids = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if ids.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {ids.shape}")
    return ids.astype("<u4", copy=False).tobytes()
