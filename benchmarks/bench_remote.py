"""Remote tier throughput against the plain client, measured in the same run on one server.

Puts and gets of Llama-3.1-8B-shaped 256-token chunks (32 MiB each), ``--chunks`` per request:

* ``tier``: the remote tier as the storage manager drives it, from and into pinned-pool slots
  (put = submit + flush; get = ``contains_prefix`` + ``load_prefix``, the manager's two calls);
* ``engine``: end to end with ``local_cpu: false``, so every store writes the remote tier and
  every retrieve reads it (adds the engine's own copy of KV into / out of the pool);
* ``raw``: the ``valkey`` client's SET/GET of the same bytes (header + payload), sequential or
  pipelined, whichever is faster.

The target (ratio >= 0.8 of raw) applies to the tier; the engine ratios are reported beside it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import valkey
from bench_engine import GIB, LLAMA_8B, timed

from lmcache import LMCacheEngine, LMCacheEngineConfig
from lmcache.memory.pool import ChunkBuffer, MemoryPool
from lmcache.metrics import EngineMetrics
from lmcache.storage import serde
from lmcache.storage.remote import create_remote_backend
from lmcache.storage.remote.devserver import RedisServer

TARGET = 0.8


def raw_client_times(server: RedisServer, values: list[bytes], repeat: int) -> dict[str, float]:
    """The plain client's SET and GET times for ``values``, sequential and pipelined."""
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
    client.flushall()
    client.close()
    return times


def tier_times(config: LMCacheEngineConfig, values: list[bytes], repeat: int) -> dict[str, float]:
    """Put/get of the same payloads through the remote tier, slot to slot."""
    pool = MemoryPool(config, LLAMA_8B)
    backend = create_remote_backend(config, LLAMA_8B, EngineMetrics({"model": "bench"}))
    keys = [serde.decode_header(v).key for v in values]
    sources: list[ChunkBuffer] = []
    for value in values:
        buffer = pool.allocate(config.chunk_size)
        assert buffer is not None
        payload = torch.frombuffer(
            bytearray(value[serde.decode_header(value).size :]), dtype=torch.uint8
        )
        buffer.raw().copy_(payload)
        sources.append(buffer)
    dests = [pool.allocate(config.chunk_size) for _ in values]
    assert all(d is not None for d in dests)

    def put() -> None:
        for key, buffer in zip(keys, sources, strict=True):
            backend.submit(key, buffer, lambda: None)
        assert backend.flush(60)

    def get() -> None:
        assert backend.contains_prefix(keys) == len(keys)
        assert backend.load_prefix(keys, dests) == len(keys)  # type: ignore[arg-type]

    times = {"put": timed(put, repeat), "get": timed(get, repeat)}
    assert all(torch.equal(s.raw(), d.raw()) for s, d in zip(sources, dests, strict=True))  # type: ignore[union-attr]
    backend.close()
    pool.close()
    return times


def engine_times(config: LMCacheEngineConfig, kv: torch.Tensor, repeat: int) -> dict[str, float]:
    num_tokens = kv.shape[2]
    out = torch.empty_like(kv)
    prompts = iter(range(1, 1_000_000))
    with LMCacheEngine(config, LLAMA_8B, model_name="llama-3.1-8b") as engine:

        def put() -> None:
            offset = next(prompts) * num_tokens
            assert engine.store(list(range(offset, offset + num_tokens)), kv) == num_tokens
            assert engine.flush(60)

        tokens = list(range(num_tokens))

        def get() -> None:
            assert engine.retrieve(tokens, out=out)[0] == num_tokens

        put_s = timed(put, repeat)
        engine.store(tokens, kv)
        assert engine.flush(60)
        get_s = timed(get, repeat)
        assert torch.equal(out, kv)
    return {"put": put_s, "get": get_s}


def encoded_chunks(config: LMCacheEngineConfig, kv: torch.Tensor) -> list[bytes]:
    """The values the tier stores for ``kv``: serde header + raw payload, one per chunk."""
    with LMCacheEngine(config, LLAMA_8B, model_name="llama-3.1-8b") as engine:
        chunks = engine.chunks(list(range(kv.shape[2])))
    values = []
    for chunk in chunks:
        piece = kv[:, :, chunk.start : chunk.end].contiguous().view(torch.uint8)
        payload = piece.numpy().reshape(-1).data
        header = serde.header_for(chunk.key, LLAMA_8B, chunk.num_tokens, payload)
        values.append(header.encode() + bytes(payload))
    return values


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
            values = encoded_chunks(config, kv)
            raw = raw_client_times(server, values, args.repeat)
            tier = tier_times(config, values, args.repeat)
            engine = engine_times(config, kv, args.repeat)
        finally:
            server.stop()

    raw_put = min(raw["set_each"], raw["set_pipelined"])
    raw_get = min(raw["get_each"], raw["get_pipelined"])
    gbps = {
        "raw_put": nbytes / raw_put / 1e9,
        "raw_get": nbytes / raw_get / 1e9,
        "tier_put": nbytes / tier["put"] / 1e9,
        "tier_get": nbytes / tier["get"] / 1e9,
        "engine_put": nbytes / engine["put"] / 1e9,
        "engine_get": nbytes / engine["get"] / 1e9,
    }
    ratios = {
        "tier_put": raw_put / tier["put"],
        "tier_get": raw_get / tier["get"],
        "engine_put": raw_put / engine["put"],
        "engine_get": raw_get / engine["get"],
    }
    ok = ratios["tier_put"] >= TARGET and ratios["tier_get"] >= TARGET
    result = {
        "chunks_per_request": args.chunks,
        "chunk_bytes": chunk_bytes,
        "request_bytes": nbytes,
        "remote_timeout_ms": args.timeout_ms,
        "raw_client_seconds": raw,
        "gbps": gbps,
        "ratios_vs_raw_client": ratios,
        "target": f"tier_put and tier_get >= {TARGET}",
        "ok": ok,
    }
    print(f"{args.chunks} x {chunk_bytes >> 20} MiB chunks per request ({nbytes / GIB:.2f} GiB)")
    for op in ("put", "get"):
        print(
            f"{op}: raw client {gbps['raw_' + op]:.2f} GB/s | tier {gbps['tier_' + op]:.2f} GB/s "
            f"(x{ratios['tier_' + op]:.2f}) | engine {gbps['engine_' + op]:.2f} GB/s "
            f"(x{ratios['engine_' + op]:.2f})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}; target ({result['target']}) met: {ok}")


if __name__ == "__main__":
    main()
