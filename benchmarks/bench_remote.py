"""Remote tier throughput against the plain client, measured in the same run on one server.

Puts and gets of Llama-3.1-8B-shaped 256-token chunks (32 MiB each) through the engine with
``local_cpu: false`` (so every retrieve really reads the remote tier and every store writes it),
against the ``valkey`` client's own SET/GET of the same bytes (header + payload), sequential or
pipelined, whichever is faster. Both talk to one throwaway ``redis-server`` on loopback.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import valkey

from lmcache import KVSpec, LMCacheEngine, LMCacheEngineConfig
from lmcache.storage import serde
from lmcache.storage.remote.devserver import RedisServer

LLAMA_8B = KVSpec(num_layers=32, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
GIB = 1 << 30
TARGET = 0.8


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs, after one warm-up."""
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def raw_client_times(server: RedisServer, values: list[bytes], repeat: int) -> dict[str, float]:
    """The plain client's best SET and GET time for ``values`` (sequential vs pipelined)."""
    client = valkey.Valkey(host="127.0.0.1", port=server.port)
    keys = [f"raw-{i}" for i in range(len(values))]

    def set_each() -> None:
        for key, value in zip(keys, values, strict=True):
            client.set(key, value)

    def set_pipelined() -> None:
        pipe = client.pipeline(transaction=False)
        for key, value in zip(keys, values, strict=True):
            pipe.set(key, value)
        pipe.execute()

    def get_each() -> None:
        for key, value in zip(keys, values, strict=True):
            assert len(client.get(key)) == len(value)  # type: ignore[arg-type]

    def get_pipelined() -> None:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        assert len(pipe.execute()) == len(keys)

    times = {
        "set_each": timed(set_each, repeat),
        "set_pipelined": timed(set_pipelined, repeat),
        "get_each": timed(get_each, repeat),
        "get_pipelined": timed(get_pipelined, repeat),
    }
    client.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=8, help="256-token chunks per request")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--timeout-ms", type=int, default=50, help="remote_timeout_ms")
    parser.add_argument("--out", type=Path, default=Path(".bench/remote.json"))
    args = parser.parse_args()

    num_tokens = args.chunks * args.chunk_size
    chunk_bytes = args.chunk_size * LLAMA_8B.bytes_per_token
    nbytes = num_tokens * LLAMA_8B.bytes_per_token
    kv = torch.randn(LLAMA_8B.shape(num_tokens)).to(LLAMA_8B.dtype)
    out = torch.empty_like(kv)

    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            config = LMCacheEngineConfig.from_mapping(
                {
                    "chunk_size": args.chunk_size,
                    "local_cpu": False,
                    "max_local_cpu_size": 2 * (args.chunks + 1) * chunk_bytes / GIB,
                    "remote_url": server.url,
                    "remote_timeout_ms": args.timeout_ms,
                    "remote_write_queue_size": (args.chunks + 1) * chunk_bytes / GIB,
                }
            )
            prompts = iter(range(1_000_000))
            with LMCacheEngine(config, LLAMA_8B, model_name="llama-3.1-8b") as engine:
                scheme = engine.scheme

                def put() -> None:
                    offset = next(prompts) * num_tokens
                    assert engine.store(list(range(offset, offset + num_tokens)), kv) == num_tokens
                    assert engine.flush(60)

                tokens = list(range(num_tokens))

                def get() -> None:
                    assert engine.retrieve(tokens, out=out)[0] == num_tokens

                put_s = timed(put, args.repeat)
                engine.store(tokens, kv)
                assert engine.flush(60)
                get_s = timed(get, args.repeat)
                assert torch.equal(out, kv)
                errors = engine.metrics.value("lmcache_tier_errors_total", tier="remote", op="get")

            flat = kv.view(torch.uint8).reshape(-1) if kv.is_contiguous() else None
            assert flat is not None
            values = []
            for chunk in scheme.chunks(tokens, include_partial=False):
                piece = kv[:, :, chunk.start : chunk.end].contiguous().view(torch.uint8)
                payload = piece.numpy().reshape(-1).data
                header = serde.header_for(chunk.key, LLAMA_8B, chunk.num_tokens, payload)
                values.append(header.encode() + bytes(payload))
            raw = raw_client_times(server, values, args.repeat)
        finally:
            server.stop()

    raw_put = min(raw["set_each"], raw["set_pipelined"])
    raw_get = min(raw["get_each"], raw["get_pipelined"])
    result: dict[str, object] = {
        "chunks_per_request": args.chunks,
        "chunk_bytes": chunk_bytes,
        "request_bytes": nbytes,
        "remote_timeout_ms": args.timeout_ms,
        "engine_put_gbps": nbytes / put_s / 1e9,
        "engine_get_gbps": nbytes / get_s / 1e9,
        "raw_client_seconds": raw,
        "raw_put_gbps": nbytes / raw_put / 1e9,
        "raw_get_gbps": nbytes / raw_get / 1e9,
        "put_ratio": raw_put / put_s,
        "get_ratio": raw_get / get_s,
        "engine_get_errors": errors,
        "target": f">= {TARGET}",
    }
    result["ok"] = result["put_ratio"] >= TARGET and result["get_ratio"] >= TARGET  # type: ignore[operator]
    print(
        f"{args.chunks} x {chunk_bytes >> 20} MiB chunks per request ({nbytes / GIB:.2f} GiB)\n"
        f"put: engine {result['engine_put_gbps']:.2f} GB/s vs raw client "
        f"{result['raw_put_gbps']:.2f} GB/s -> x{result['put_ratio']:.2f}\n"
        f"get: engine {result['engine_get_gbps']:.2f} GB/s vs raw client "
        f"{result['raw_get_gbps']:.2f} GB/s -> x{result['get_ratio']:.2f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}; target (ratio >= {TARGET}) met: {result['ok']}")


if __name__ == "__main__":
    main()
