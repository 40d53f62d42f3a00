"""Send the same long prompt twice to a vLLM server and compare the prefill times.

The seed's walkthrough with token ids instead of text, so it works against a server started
with ``--skip-tokenizer-init`` (no tokenizer download needed). The first query computes the
prompt's KV and LMCache stores it; the second loads it. With ``max_tokens: 1`` the request
time is essentially the prefill. Add ``--reset-prefix-cache`` to clear vLLM's own GPU prefix
cache between the two queries (needs ``VLLM_SERVER_DEV_MODE=1`` on the server), so that the
second hit comes from LMCache and not from vLLM's prefix cache.

    python examples/query_twice.py --url http://localhost:8000 --model <model> --tokens 8000
"""

from __future__ import annotations

import argparse
import json
import random
import time
import urllib.request
from typing import Any


def post(url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        raw = response.read()
    return json.loads(raw) if raw else {}


def query(url: str, model: str, prompt: list[int]) -> float:
    """Seconds for one completion of ``prompt`` with a single output token."""
    start = time.perf_counter()
    post(f"{url}/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 1})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--model", required=True, help="the model name the server serves")
    parser.add_argument("--tokens", type=int, default=8000, help="prompt length in tokens")
    parser.add_argument("--seed", type=int, default=0, help="changes the prompt")
    parser.add_argument("--reset-prefix-cache", action="store_true")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    prompt = [rng.randrange(1000, 30000) for _ in range(args.tokens)]
    first = query(args.url, args.model, prompt)
    print(f"first query  ({args.tokens} tokens, computed): {first:.3f} s")
    if args.reset_prefix_cache:
        post(f"{args.url}/reset_prefix_cache")
    second = query(args.url, args.model, prompt)
    print(f"second query ({args.tokens} tokens, cached):   {second:.3f} s")
    print(f"speed-up: {first / second:.1f}x")


if __name__ == "__main__":
    main()
