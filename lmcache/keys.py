"""Chunk keys: a chained hash over the whole token prefix and everything else that shapes KV.

Keys must be identical across processes, hosts and restarts so that another pod, a restarted
pod or Valkey can hit: Python's seeded ``hash()`` is never used. A chunk's *digest* is the
xxh3-128 of the request's :class:`KVContext` (cache salt, LoRA adapter), then every token from
the start of the prompt to the chunk's end, with each multimodal item's identifier hashed in
at its placeholder's position; so a digest names the entire prefix and its inputs. A *key* is
the digest behind the :class:`KeyScheme` prefix (model identity, KV dtype, TP shard, chunk
size): digests are what vLLM's scheduler computes once per request and ships to every rank,
keys are what one rank's tiers store under.
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

MAX_TOKEN_ID = (1 << 32) - 1
"""Token ids are hashed as uint32: anything outside would wrap onto another prompt's key."""


class ChunkRange(NamedTuple):
    """Tokens ``[start, end)`` of a prompt and the key (or digest) of the prefix ending at
    ``end``.

    A NamedTuple, not a dataclass: a 128k-token lookup builds 512 of these and frozen
    dataclasses cost several times more to construct."""

    start: int
    end: int
    key: str

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class KVContext:
    """What besides the token ids changes a request's KV, or must keep it apart.

    ``cache_salt`` isolates tenants (vLLM's per-request salt), ``lora`` names the adapter,
    ``multimodal`` lists ``(placeholder offset, content hash)`` of each image/audio item: their
    placeholder token ids are the same for every item, so the content hash is what differs.
    """

    cache_salt: str | None = None
    lora: str | None = None
    multimodal: tuple[tuple[int, str], ...] = ()

    def header(self) -> bytes:
        """Hashed before the first token; empty for a plain request, so its keys do not
        depend on this class existing."""
        if self.cache_salt is None and self.lora is None:
            return b""
        return b"\x00ctx\x00%s\x00%s\x00" % (
            (self.cache_salt or "").encode(),
            (self.lora or "").encode(),
        )


PLAIN = KVContext()


def chunk_digests(
    tokens: Tokens, chunk_size: int, include_partial: bool, context: KVContext = PLAIN
) -> list[ChunkRange]:
    """``(start, end, digest)`` of each storable chunk of ``tokens``; the trailing partial
    chunk only if ``include_partial``."""
    data = as_token_bytes(tokens)
    num_tokens = len(data) // 4
    limit = num_tokens if include_partial else num_tokens - num_tokens % chunk_size
    # One streaming xxh3-128 state over the whole prompt: the digest after each chunk hashes
    # the entire prefix, in O(n) total and without copying any chunk.
    state = xxhash.xxh3_128()
    state.update(context.header())
    view = memoryview(data)
    items = sorted(context.multimodal)
    item = 0
    out: list[ChunkRange] = []
    for start in range(0, limit, chunk_size):
        end = min(start + chunk_size, limit)
        position = start
        while item < len(items) and items[item][0] < end:
            offset, identifier = items[item]
            offset = max(offset, position)
            state.update(view[position * 4 : offset * 4])
            state.update(b"\x00mm\x00%s\x00" % identifier.encode())
            position = offset
            item += 1
        state.update(view[position * 4 : end * 4])
        out.append(ChunkRange(start, end, state.hexdigest()))
    return out


@dataclass(frozen=True)
class KeyScheme:
    """Everything about an engine that makes its KV reusable only by an identical engine:
    model identity (name, revision, weights/config hash), KV dtype, TP/PP shard, chunk size."""

    model_name: str
    world_size: int
    rank: int
    dtype_name: str
    chunk_size: int

    @property
    def prefix(self) -> str:
        """Everything a key depends on besides the digest. ``chunk_size`` is part of it: with
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

    def key(self, digest: str) -> str:
        return self.prefix + digest

    def keys(self, digests: Sequence[ChunkRange]) -> list[ChunkRange]:
        """Digest ranges (from :func:`chunk_digests`) as this engine's key ranges."""
        prefix = self.prefix
        return [ChunkRange(c.start, c.end, prefix + c.key) for c in digests]

    def chunks(
        self, tokens: Tokens, include_partial: bool, context: KVContext = PLAIN
    ) -> list[ChunkRange]:
        """Chunk ranges with keys; the trailing partial chunk only if ``include_partial``."""
        return self.keys(chunk_digests(tokens, self.chunk_size, include_partial, context))


def as_token_bytes(tokens: Tokens) -> bytes:
    """Token ids as little-endian uint32 bytes: one fixed encoding for every input type.

    Refuses what that encoding cannot hold exactly (floats, negatives, ids >= 2^32): truncated
    or wrapped, such ids would hash like another prompt's and load its KV."""
    if isinstance(tokens, list):  # vLLM's prompt_token_ids; array() is 3x faster than numpy here
        try:
            packed = array.array("I", tokens)
        except (OverflowError, TypeError):
            raise ValueError(_bad_tokens(tokens)) from None
        if sys.byteorder == "big":
            packed.byteswap()
        return packed.tobytes()
    ids = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if ids.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {ids.shape}")
    if ids.size and (
        ids.dtype.kind not in "iu" or int(ids.min()) < 0 or int(ids.max()) > MAX_TOKEN_ID
    ):
        raise ValueError(_bad_tokens(ids))
    return ids.astype("<u4", copy=False).tobytes()


def _bad_tokens(tokens: object) -> str:
    kind = getattr(tokens, "dtype", None) or type(tokens).__name__
    return f"token ids must be integers in [0, {MAX_TOKEN_ID}] (got {kind} input outside that)"
