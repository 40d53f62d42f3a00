"""The seed's "query twice" experiment, on the engine alone (no GPU, no vLLM).

A small Llama with random weights (built locally, nothing downloaded) computes the KV of a long
context; the engine, on its embedded default config (local CPU hot cache), stores it. Asking the
same question again loads the KV instead of recomputing it. Prints cold vs warm time-to-KV and
the engine's hit/store log lines.

Config comes from the usual places: LMCACHE_CONFIG_FILE and LMCACHE_* env vars.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmcache import KVSpec, LMCacheEngine, LMCacheEngineConfig


def build_model(layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768,
        torch_dtype=torch.bfloat16,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def prefill_kv(model: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    """Run the prompt through the model; KV as ``[layers, 2, tokens, kv_heads, head_dim]``."""
    with torch.inference_mode():
        out = model(torch.tensor([tokens]), use_cache=True)
    cache = out.cache
    per_layer = [
        torch.stack([layer.keys[0], layer.values[0]]).transpose(1, 2)
        for layer in cache.layers
    ]
    return torch.stack(per_layer).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context-tokens", type=int, default=6000)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()

    model = build_model(args.layers)
    cfg = model.config
    spec = KVSpec(cfg.num_hidden_layers, cfg.num_key_value_heads,
                  cfg.hidden_size // cfg.num_attention_heads, torch.bfloat16)
    config = LMCacheEngineConfig.load()
    generator = torch.Generator().manual_seed(1)
    context = torch.randint(0, cfg.vocab_size, (args.context_tokens,), generator=generator)
    question = [101, 2054, 2003, 14517, 1029]
    prompt = context.tolist() + question
    print(f"prompt: {len(prompt)} tokens; KV {len(prompt) * spec.bytes_per_token / 2**20:.1f} "
          f"MiB; chunk_size={config.chunk_size}, max_local_cpu_size={config.max_local_cpu_size} "
          f"GB, local_cpu={config.local_cpu}")

    with LMCacheEngine(config, spec, model_name="demo-llama") as engine:

        def time_to_kv(request_id: str) -> tuple[float, torch.Tensor]:
            start = time.perf_counter()
            hit = engine.lookup(prompt, request_id=request_id)
            if hit == len(prompt):
                _, kv = engine.retrieve(prompt)
            else:
                kv = prefill_kv(model, prompt)
                engine.store(prompt, kv, request_id=request_id)
            return time.perf_counter() - start, kv

        print("\nQuerying with a cold LMCache CPU cache")
        cold, cold_kv = time_to_kv("demo-cold")
        print(f"Cold time-to-KV: {cold:.3f} seconds")
        print("\nQuerying with a warm LMCache CPU cache")
        warm, warm_kv = time_to_kv("demo-warm")
        print(f"Warm time-to-KV: {warm:.3f} seconds")
        assert torch.equal(cold_kv, warm_kv), "the loaded KV must be exactly what was computed"
        print(f"\nTime-to-KV improvement: {cold - warm:.3f} seconds ({cold / warm:.1f}x faster); "
              "loaded KV is byte-identical to the computed KV")


if __name__ == "__main__":
    main()
