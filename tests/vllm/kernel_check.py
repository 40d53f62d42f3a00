"""Run with TRITON_INTERPRET=1 (CPU): the Triton slot copier against plain indexing, for every
paged layout, both directions, partial chunk ranges, several jobs and a layer subset.
Prints "ok" or raises."""

from __future__ import annotations

import os

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run under the Triton interpreter"

from lmcache.integration.vllm.kernels import SlotCopier  # noqa: E402
from lmcache.integration.vllm.paged import PagedKVCache, PagedLayout  # noqa: E402
from tests.vllm.conftest import BLOCK, SlotIO, make_paged  # noqa: E402

LAYERS, BLOCKS = 3, 16


def check(layout: PagedLayout, hnd: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        layer = make_paged(layout, BLOCKS, hnd=hnd)
        layer.copy_(torch.randn(layer.shape, generator=gen))
        layers.append(layer)
    cache = PagedKVCache(layers)
    spec = cache.spec
    copier = SlotCopier(cache.layers, cache.strides, cache.block_size)
    io = SlotIO(layout)
    jobs, n_chunk, lo, hi = 2, 8, 3, 7
    slots = torch.randperm(BLOCKS * BLOCK, generator=gen)[: jobs * (hi - lo)]
    staged = torch.zeros(jobs, LAYERS, spec.kv_factor, n_chunk, spec.num_kv_heads, spec.head_size)
    args = (spec.kv_factor, spec.num_kv_heads, spec.head_size)
    copier(staged, slots, hi - lo, n_chunk, lo, 0, LAYERS, *args, to_staging=True)
    for t, slot in enumerate(slots.tolist()):
        job, position = divmod(t, hi - lo)
        for layer in range(LAYERS):
            want = io.get(layers[layer], torch.tensor([slot]))[0].reshape(-1)
            got = staged[job, layer, :, lo + position].reshape(-1)
            assert torch.equal(got, want), (layout, hnd, t, layer)
    untouched = staged.clone()
    untouched[:, :, :, lo:hi] = 0
    assert not untouched.any(), "positions outside lo:hi are left alone"

    before = [layer.clone() for layer in layers]
    one_layer = torch.randn(jobs, 1, spec.kv_factor, n_chunk, spec.num_kv_heads, spec.head_size)
    copier(one_layer, slots, hi - lo, n_chunk, lo, 2, 1, *args, to_staging=False)
    for t, slot in enumerate(slots.tolist()):
        job, position = divmod(t, hi - lo)
        got = io.get(layers[2], torch.tensor([slot]))[0].reshape(-1)
        assert torch.equal(got, one_layer[job, 0, :, lo + position].reshape(-1)), (layout, t)
    for layer in (0, 1):
        assert torch.equal(layers[layer], before[layer]), "other layers untouched"
    mask = torch.ones(BLOCKS * BLOCK, dtype=torch.bool)
    mask[slots] = False
    rest = mask.nonzero().flatten()
    assert torch.equal(io.get(layers[2], rest), io.get(before[2], rest)), "other slots untouched"


for layout, hnd in [
    (PagedLayout.KV_FIRST, False),
    (PagedLayout.BLOCK_FIRST, False),
    (PagedLayout.BLOCK_FIRST, True),
    (PagedLayout.MLA, False),
]:
    check(layout, hnd)
print("ok")
