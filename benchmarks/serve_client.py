"""A client of one OpenAI-compatible vLLM server for the serving benchmark (aiohttp).

Time to first token is the time from sending a streaming ``/v1/completions`` request (token-id
prompt, greedy) to reading the first streamed chunk that carries a token. Token ids of the output
are asked for only where they are needed (the output check, the chat history): with
``return_token_ids`` vLLM puts the whole prompt's ids in the first chunk, which would add its
serialization to the time measured.

Where a hit came from is read off vLLM's Prometheus counters around a request:
``vllm:prefix_cache_hits_total`` (tokens found in the GPU prefix cache) and
``vllm:external_prefix_cache_hits_total`` (tokens a KV connector loaded).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import aiohttp

GPU_HITS = "vllm:prefix_cache_hits_total"
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"


@dataclass
class Completion:
    ttft_s: float
    latency_s: float
    num_tokens: int
    token_ids: list[int] = field(default_factory=list)
    """The generated ids, when asked for."""


@dataclass(frozen=True)
class Hits:
    gpu: float
    external: float

    def __sub__(self, other: Hits) -> Hits:
        return Hits(self.gpu - other.gpu, self.external - other.external)


class ServerError(RuntimeError):
    """The server answered a request with an error."""


def counter_total(metrics_text: str, name: str) -> float:
    """Sum of every sample of the counter ``name`` (all label sets) in Prometheus text format."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def session(timeout_s: float) -> aiohttp.ClientSession:
    """A session whose stream reader takes the first chunk of a long prompt's ids in one line."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s), read_bufsize=1 << 23
    )


class Server:
    def __init__(self, http: aiohttp.ClientSession, url: str, model: str) -> None:
        self.http = http
        self.url = url.rstrip("/")
        self.model = model

    async def complete(
        self, prompt: list[int], max_tokens: int, token_ids: bool = False
    ) -> Completion:
        """One greedy streamed completion of exactly ``max_tokens`` tokens."""
        body: dict[str, object] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if token_ids:
            body["return_token_ids"] = True
        start = time.perf_counter()
        first: float | None = None
        ids: list[int] = []
        chunks = 0
        usage_tokens: int | None = None
        async with self.http.post(self.url + "/v1/completions", json=body) as response:
            if response.status != 200:
                raise ServerError(f"{self.url}: HTTP {response.status}: {await response.text()}")
            async for raw in response.content:
                arrived = time.perf_counter()
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    raise ServerError(f"{self.url}: {event['error']}")
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or []:
                    if first is None:
                        first = arrived
                    chunks += 1
                    ids.extend(choice.get("token_ids") or [])
        end = time.perf_counter()
        if first is None:
            raise ServerError(f"{self.url}: the stream ended without a token")
        count = usage_tokens if usage_tokens is not None else chunks
        return Completion(first - start, end - start, count, ids)

    async def reset_prefix_cache(self) -> None:
        """Drop vLLM's GPU prefix cache (not a connector's): a repeat must hit somewhere else."""
        async with self.http.post(self.url + "/reset_prefix_cache") as response:
            if response.status != 200:
                raise ServerError(
                    f"{self.url}/reset_prefix_cache: HTTP {response.status} "
                    "(is VLLM_SERVER_DEV_MODE=1 set?)"
                )

    async def hits(self) -> Hits:
        async with self.http.get(self.url + "/metrics") as response:
            text = await response.text()
        return Hits(counter_total(text, GPU_HITS), counter_total(text, EXTERNAL_HITS))
