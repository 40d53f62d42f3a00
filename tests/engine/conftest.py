"""Small real engines on real torch tensors (CPU), sized so tests run in milliseconds."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from lmcache import KVSpec, LMCacheEngine, LMCacheEngineConfig

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_size=16, dtype=torch.bfloat16)
CHUNK = 16
CHUNK_BYTES = CHUNK * SPEC.bytes_per_token
GB = 1 << 30

EngineFactory = Callable[..., LMCacheEngine]


def pool_gb(chunks: int) -> float:
    """A ``max_local_cpu_size`` that holds exactly ``chunks`` full chunks of ``SPEC``."""
    return chunks * CHUNK_BYTES / GB


def random_kv(num_tokens: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(SPEC.shape(num_tokens), generator=gen).to(SPEC.dtype)


def tokens(n: int, offset: int = 0) -> list[int]:
    return list(range(offset, offset + n))


@pytest.fixture
def make_engine() -> Iterator[EngineFactory]:
    engines: list[LMCacheEngine] = []

    def make(
        model_name: str = "test-model", rank: int = 0, world_size: int = 1, **config: Any
    ) -> LMCacheEngine:
        values = {"chunk_size": CHUNK, "max_local_cpu_size": pool_gb(64), **config}
        engine = LMCacheEngine(
            LMCacheEngineConfig.from_mapping(values),
            SPEC,
            model_name=model_name,
            world_size=world_size,
            rank=rank,
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()
