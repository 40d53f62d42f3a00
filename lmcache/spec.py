"""The shape of the KV cache the engine stores, one chunk at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVSpec:
    """Per-rank KV geometry of one model.

    The engine's canonical KV layout is ``[num_layers, kv_factor, tokens, num_kv_heads,
    head_size]``: ``kv_factor`` is 2 (K and V) for ordinary attention and 1 for MLA, whose
    latent cache has a single "head".
    """

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype = torch.bfloat16
    kv_factor: int = 2

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVSpec.{name} must be > 0, got {getattr(self, name)}")
        if self.kv_factor not in (1, 2):
            raise ValueError(f"KVSpec.kv_factor must be 1 (MLA) or 2, got {self.kv_factor}")

    @classmethod
    def mla(cls, num_layers: int, head_size: int, dtype: torch.dtype) -> KVSpec:
        return cls(num_layers, 1, head_size, dtype, kv_factor=1)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return (
            self.num_layers
            * self.kv_factor
            * self.num_kv_heads
            * self.head_size
            * (self.element_size)
        )

    def shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.kv_factor, num_tokens, self.num_kv_heads, self.head_size)

    def check(self, kv: torch.Tensor, num_tokens: int) -> None:
        """Refuse KV whose shape or dtype does not match this spec (never store garbage)."""
        want = self.shape(num_tokens)
        if tuple(kv.shape) != want or kv.dtype != self.dtype:
            raise ValueError(
                f"KV tensor is {tuple(kv.shape)} {kv.dtype}; expected {want} {self.dtype} "
                f"([num_layers, kv_factor, tokens, num_kv_heads, head_size])"
            )
