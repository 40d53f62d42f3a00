"""Store and load of one request between vLLM's paged KV cache and the engine's pinned pool.

A Llama-3.1-8B-shaped request (32 layers, 8 KV heads, head 128, bf16; 16k tokens = 2 GiB) sits
in a FlashAttention/FlashInfer-layout paged cache (``[num_blocks, 2, 16, 8, 128]`` per layer)
in shuffled blocks, as after a while of serving. Measured in the same run:

* the limit: a raw copy of the same bytes between one pinned host tensor and one device tensor
  (each direction), i.e. what the link gives a single large DMA (about 55 GB/s on an H200);
* store: the connector's path for a prompt not cached yet (reserve pool slots, gather by slot
  id on a side stream, one gather per layer per batch of chunks into device staging, one
  non-blocking DMA per chunk into its pinned slot; timed until the store's event completes,
  then published);
* load: the connector's path back (one DMA per pinned chunk into device staging, one scatter
  per layer per batch), after wiping the paged cache; whole-request and layer by layer;
* both again with PyTorch indexing instead of the one-launch Triton kernel, and with other
  staging sizes, to show where the default sits.

The raw copies use the pool's own memory (one ``cudaHostRegister``ed allocation), so both
sides of each ratio move the same bytes between the same kinds of memory.

Ratios are transfer / raw (1.0 = at the limit). On a machine without CUDA it runs on CPU
tensors (a smoke test; figures then compare against a CPU memcpy).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_engine import GIB, LLAMA_8B
from pinned import no_sync, raw_copy, timed

from lmcache import LMCacheEngine, LMCacheEngineConfig
from lmcache.integration.vllm.paged import (
    ChunkJob,
    Issued,
    PagedKVCache,
    PagedTransfer,
    store_jobs,
)

BLOCK = 16


def paged_cache(num_tokens: int, device: torch.device) -> tuple[PagedKVCache, torch.Tensor]:
    """A paged cache with room for the request plus 10%, and the request's shuffled slots."""
    spec = LLAMA_8B
    num_blocks = num_tokens // BLOCK * 11 // 10 + 1
    layers = [
        torch.randn(num_blocks, 2, BLOCK, spec.num_kv_heads, spec.head_size, device=device).to(
            spec.dtype
        )
        for _ in range(spec.num_layers)
    ]
    blocks = torch.randperm(num_blocks)[: -(-num_tokens // BLOCK)]
    slots = (blocks[:, None] * BLOCK + torch.arange(BLOCK)[None, :]).flatten()[:num_tokens]
    return PagedKVCache(layers), slots


def settle(issued: Issued | None) -> None:
    if issued is not None:
        issued.done.synchronize()


def run(num_tokens: int, chunk_size: int, repeat: int, staging_mib: list[int]) -> dict[str, object]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else no_sync
    nbytes = num_tokens * LLAMA_8B.bytes_per_token

    cache, slots = paged_cache(num_tokens, device)
    blocks = (slots[::BLOCK] // BLOCK).to(device)
    pool_bytes = 2 * nbytes + chunk_size * LLAMA_8B.bytes_per_token
    config = LMCacheEngineConfig.from_mapping(
        {"chunk_size": chunk_size, "max_local_cpu_size": pool_bytes / GIB}
    )
    prompts = iter(range(1_000_000))
    tokens: list[int] = []
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "tokens": num_tokens,
        "chunk_size": chunk_size,
        "bytes": nbytes,
    }

    with LMCacheEngine(config, cache.spec, model_name="llama-3.1-8b") as engine:
        host = engine.storage.pool._buffer[:nbytes]  # the pool's own (registered) memory
        raw_h2d, raw_d2h = raw_copy(host, device, repeat, sync)
        result |= {"raw_h2d_gbps": nbytes / raw_h2d / 1e9, "raw_d2h_gbps": nbytes / raw_d2h / 1e9}

        def measure(transfer: PagedTransfer, tag: str) -> None:
            def store_new_prompt() -> None:
                offset = next(prompts) * num_tokens
                tokens[:] = range(offset, offset + num_tokens)
                reserved = engine.reserve_chunks(tokens)
                settle(transfer.store(store_jobs(reserved, slots)))
                assert engine.commit_chunks(reserved) == num_tokens

            def wiped_then_loaded(layerwise: bool) -> tuple[float, bool]:
                """Seconds of a load into a zeroed cache, and whether it holds the stored KV."""
                for layer in cache.layers:
                    layer.zero_()
                seconds = timed(lambda: load_prompt(layerwise), repeat, sync)
                exact = all(
                    torch.equal(layer.index_select(0, blocks), ref)
                    for layer, ref in zip(cache.layers, reference, strict=True)
                )
                return seconds, exact

            def load_prompt(layerwise: bool) -> None:
                with engine.retrieve_chunks(tokens) as views:
                    jobs = [
                        ChunkJob(kv, 0, c.num_tokens, slots[c.start : c.end]) for c, kv in views
                    ]
                    assert sum(j.hi - j.lo for j in jobs) == num_tokens
                    settle(transfer.start_load(jobs, layerwise))
                    sync()

            store = timed(store_new_prompt, repeat, sync)
            reference = [layer.index_select(0, blocks) for layer in cache.layers]
            load, whole_exact = wiped_then_loaded(False)
            layerwise, layerwise_exact = wiped_then_loaded(True)
            exact = whole_exact and layerwise_exact
            if not exact:
                raise SystemExit(f"{tag or 'fused '}load: the KV read back differs from the stored")
            result[f"{tag}exact"] = exact
            result[f"{tag}store_gbps"] = nbytes / store / 1e9
            result[f"{tag}store_vs_raw_d2h"] = raw_d2h / store
            result[f"{tag}load_gbps"] = nbytes / load / 1e9
            result[f"{tag}load_vs_raw_h2d"] = raw_h2d / load
            result[f"{tag}layerwise_load_vs_raw_h2d"] = raw_h2d / layerwise

        measure(PagedTransfer(cache), "")
        if cuda:
            measure(PagedTransfer(cache, fused=False), "torch_indexing_")
            for mib in staging_mib:
                measure(PagedTransfer(cache, mib << 20), f"staging{mib}MiB_")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--staging-mib", type=int, nargs="*", default=[64, 256, 512])
    parser.add_argument("--out", type=Path, default=Path(".bench/vllm_transfer.json"))
    args = parser.parse_args()
    result = run(args.tokens, args.chunk_size, args.repeat, args.staging_mib)
    for key, value in result.items():
        print(f"{key:>18}: {value:.3f}" if isinstance(value, float) else f"{key:>18}: {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
