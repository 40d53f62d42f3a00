"""Engine throughput against the machine's own limits, measured in the same run.

* store / retrieve of Llama-3.1-8B-shaped KV (32 layers, 8 KV heads, head 128, bf16) for 8k-32k
  tokens, as a ratio to a raw torch copy of the same bytes between preallocated tensors of the
  same kinds (into / out of page-locked memory when CUDA pins the pool; the ratio against a
  pageable-to-pageable copy is reported too);
* lookup of a 128k-token prompt whose KV is all cached, as a fraction of the time a raw copy of
  that KV takes (the index is filled by ``store_chunks`` with a no-op fill: lookup never reads KV
  bytes, so the run need not touch 16 GiB).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from pinned import timed

from lmcache import KVSpec, LMCacheEngine, LMCacheEngineConfig

LLAMA_8B = KVSpec(num_layers=32, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
GIB = 1 << 30


def engine_for(num_tokens: int, chunk_size: int, rounds: int) -> LMCacheEngine:
    size = rounds * num_tokens * LLAMA_8B.bytes_per_token + chunk_size * LLAMA_8B.bytes_per_token
    config = LMCacheEngineConfig.from_mapping(
        {"chunk_size": chunk_size, "max_local_cpu_size": size / GIB}
    )
    return LMCacheEngine(config, LLAMA_8B, model_name="llama-3.1-8b")


def pool_kind_limits(
    src: torch.Tensor, dst: torch.Tensor, raw: float, repeat: int
) -> tuple[float, float]:
    """Raw copy times into and out of the pool's kind of memory.

    The pool is page-locked when CUDA is present, and writing or reading pinned memory can
    differ from pageable memory, so the fair limit is a copy into / out of pinned memory."""
    if not torch.cuda.is_available():
        return raw, raw
    pinned = torch.empty_like(src, pin_memory=True)
    return timed(lambda: pinned.copy_(src), repeat), timed(lambda: dst.copy_(pinned), repeat)


def bench_store_retrieve(num_tokens: int, chunk_size: int, repeat: int) -> dict[str, float]:
    nbytes = num_tokens * LLAMA_8B.bytes_per_token
    src = torch.randn(LLAMA_8B.shape(num_tokens)).to(LLAMA_8B.dtype)
    dst = torch.empty_like(src)
    raw = timed(lambda: dst.copy_(src), repeat)
    raw_into_pool, raw_from_pool = pool_kind_limits(src, dst, raw, repeat)

    prompts = iter(range(1_000_000))

    with engine_for(num_tokens, chunk_size, rounds=2) as engine:

        def store_new_prompt() -> None:
            offset = next(prompts) * num_tokens
            stored = engine.store(list(range(offset, offset + num_tokens)), src)
            assert stored == num_tokens

        store = timed(store_new_prompt, repeat)
        tokens = list(range(num_tokens))
        engine.store(tokens, src)
        retrieve = timed(lambda: engine.retrieve(tokens, out=dst), repeat)
        assert torch.equal(dst, src)
    return {
        "tokens": num_tokens,
        "bytes": nbytes,
        "raw_copy_gbps": nbytes / raw / 1e9,
        "raw_into_pool_kind_gbps": nbytes / raw_into_pool / 1e9,
        "raw_from_pool_kind_gbps": nbytes / raw_from_pool / 1e9,
        "store_gbps": nbytes / store / 1e9,
        "retrieve_gbps": nbytes / retrieve / 1e9,
        "store_ratio": raw_into_pool / store,
        "retrieve_ratio": raw_from_pool / retrieve,
        "store_ratio_vs_pageable_copy": raw / store,
        "retrieve_ratio_vs_pageable_copy": raw / retrieve,
    }


def bench_lookup(
    num_tokens: int, chunk_size: int, copy_gbps: float, repeat: int
) -> dict[str, float]:
    with engine_for(num_tokens, chunk_size, rounds=1) as engine:
        tokens = list(range(num_tokens))
        engine.store_chunks(tokens, lambda chunk, dst: None)
        assert engine.lookup(tokens) == num_tokens
        lookup = timed(lambda: engine.lookup(tokens), repeat)
    nbytes = num_tokens * LLAMA_8B.bytes_per_token
    copy_seconds = nbytes / (copy_gbps * 1e9)
    return {
        "tokens": num_tokens,
        "lookup_seconds": lookup,
        "copy_seconds_at_raw_rate": copy_seconds,
        "lookup_fraction_of_copy": lookup / copy_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--lookup-tokens", type=int, default=131072)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(".bench/engine.json"))
    args = parser.parse_args()

    result: dict[str, object] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "kv_bytes_per_token": LLAMA_8B.bytes_per_token,
        "targets": {"store_ratio": ">= 0.8", "retrieve_ratio": ">= 0.8", "lookup": "<= 0.001"},
    }
    runs = [bench_store_retrieve(n, args.chunk_size, args.repeat) for n in args.tokens]
    for run in runs:
        print(
            f"{run['tokens']:>6} tokens {run['bytes'] / GIB:5.2f} GiB | raw copy "
            f"{run['raw_copy_gbps']:6.2f} GB/s (into pool kind "
            f"{run['raw_into_pool_kind_gbps']:.2f}, out of it {run['raw_from_pool_kind_gbps']:.2f})"
            f" | store {run['store_gbps']:6.2f} "
            f"GB/s (x{run['store_ratio']:.2f}) | retrieve {run['retrieve_gbps']:6.2f} GB/s "
            f"(x{run['retrieve_ratio']:.2f})"
        )
    copy_gbps = statistics.median(r["raw_copy_gbps"] for r in runs)
    lookup = bench_lookup(args.lookup_tokens, args.chunk_size, copy_gbps, args.repeat)
    print(
        f"lookup {lookup['tokens']} tokens: {lookup['lookup_seconds'] * 1e3:.3f} ms = "
        f"{lookup['lookup_fraction_of_copy'] * 100:.4f}% of copying its KV "
        f"({lookup['copy_seconds_at_raw_rate']:.2f} s at {copy_gbps:.2f} GB/s)"
    )
    result["store_retrieve"] = runs
    result["lookup"] = lookup
    result["ok"] = all(r["store_ratio"] >= 0.8 and r["retrieve_ratio"] >= 0.8 for r in runs) and (
        lookup["lookup_fraction_of_copy"] <= 0.001
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}; targets met: {result['ok']}")


if __name__ == "__main__":
    main()
