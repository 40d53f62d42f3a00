"""One Triton kernel that moves a batch of tokens between vLLM's paged layers and staging.

PyTorch indexing needs one gather or scatter per layer (two kernels each, and tens of
microseconds of CPU to launch them): for a 32-layer model and a prompt of 60 chunks that is
thousands of launches per step, enough to leave the copy engine waiting. This kernel takes
every layer at once, addressed as element offsets from the first layer's storage (vLLM
allocates each layer separately), so a batch costs one launch. It handles every layout
``PagedKVCache`` accepts through the layers' strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_tokens", "n_chunk", "lo", "first"])
def _copy_slots(
    base,
    layer_offsets,
    staging,
    slots,
    n_tokens,
    n_chunk,
    lo,
    first,
    s_kv,
    s_block,
    s_off,
    s_head,
    s_dim,
    block_size,
    KVF: tl.constexpr,
    LAYERS: tl.constexpr,
    HEADS: tl.constexpr,
    DIM: tl.constexpr,
    BH: tl.constexpr,
    BD: tl.constexpr,
    TO_STAGING: tl.constexpr,
):
    """Program (t, lk): token t of the batch (job t // n_tokens, chunk position
    lo + t % n_tokens), staged layer lk // KVF (paged layer first + that), K or V lk % KVF.
    Staging is ``[jobs, LAYERS, KVF, n_chunk, HEADS, DIM]`` contiguous."""
    t = tl.program_id(0)
    lk = tl.program_id(1)
    layer = lk // KVF
    kv = lk % KVF
    job = t // n_tokens
    position = lo + t % n_tokens
    slot = tl.load(slots + t)
    block = slot // block_size
    offset = slot % block_size
    h = tl.arange(0, BH)[:, None]
    d = tl.arange(0, BD)[None, :]
    mask = (h < HEADS) & (d < DIM)
    paged = (
        base
        + tl.load(layer_offsets + first + layer)
        + kv * s_kv
        + block * s_block
        + offset * s_off
        + h * s_head
        + d * s_dim
    )
    staged = (
        staging + ((((job * LAYERS + layer) * KVF + kv) * n_chunk + position) * HEADS + h) * DIM + d
    )
    if TO_STAGING:
        tl.store(staged, tl.load(paged, mask=mask), mask=mask)
    else:
        tl.store(paged, tl.load(staged, mask=mask), mask=mask)


class SlotCopier:
    """The kernel bound to one paged cache: its layers' offsets and strides, computed once."""

    def __init__(
        self, layers: list[torch.Tensor], strides: tuple[int, int, int, int, int], block_size: int
    ) -> None:
        """``strides``: element strides of one layer as ``(kv, block, offset, head, dim)``
        (0 where the layout has no such axis)."""
        self.base = layers[0]
        size = self.base.element_size()
        self.offsets = torch.tensor(
            [(layer.data_ptr() - self.base.data_ptr()) // size for layer in layers],
            dtype=torch.int64,
            device=self.base.device,
        )
        self.strides = strides
        self.block_size = block_size

    def __call__(
        self,
        staging: torch.Tensor,
        slots: torch.Tensor,
        n_tokens: int,
        n_chunk: int,
        lo: int,
        first: int,
        num_layers: int,
        kv_factor: int,
        heads: int,
        dim: int,
        to_staging: bool,
    ) -> None:
        """Copy ``slots`` (``jobs * n_tokens`` ids, device) of layers ``[first, first +
        num_layers)`` to or from ``staging`` (``[jobs, num_layers, kv, n_chunk, heads, dim]``,
        positions ``lo`` to ``lo + n_tokens``), on the current stream."""
        grid = (slots.numel(), num_layers * kv_factor)
        _copy_slots[grid](
            self.base,
            self.offsets,
            staging,
            slots,
            n_tokens,
            n_chunk,
            lo,
            first,
            *self.strides,
            self.block_size,
            KVF=kv_factor,
            LAYERS=num_layers,
            HEADS=heads,
            DIM=dim,
            BH=triton.next_power_of_2(heads),
            BD=triton.next_power_of_2(dim),
            TO_STAGING=to_staging,
        )
