"""The seed's TTFT experiment against a real ``vllm serve`` (GPU machine).

Starts the seed's exact command shape -- ``LMCACHE_CONFIG_FILE=cpu-offload.yaml vllm serve
<model> --kv-transfer-config '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'`` --
with a Llama-3.1-8B-shaped model of random weights (``--load-format dummy``, no tokenizer: the
prompt is token ids), queries the same long prompt twice and reports cold vs warm time to first
token (the latency of a ``max_tokens=1`` request) and the engine's log lines. vLLM's own GPU prefix
cache is turned off so the warm hit must come from LMCache (the seed ran on a 23 GB L4, where the
prefix did not stay in GPU memory; an H200 would keep it). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

SEED_CONFIG = "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 5.0\n"
KV_TRANSFER = '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'
HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE.parent / "examples" / "models" / "llama-3.1-8b-dummy"


def wait_healthy(url: str, server: subprocess.Popen[bytes], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)  # polling an external server's readiness, bounded by the deadline
    raise TimeoutError(f"vllm serve not healthy after {deadline_s}s")


def ttft(url: str, model: str, prompt: list[int]) -> float:
    """Latency of a one-token completion: prefill (or KV load) + one decode step."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0})
    request = urllib.request.Request(
        url + "/v1/completions", body.encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--prompt-tokens", type=int, default=15410)
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--out", type=Path, default=Path(".bench/vllm_serve.json"))
    parser.add_argument("--log", type=Path, default=Path(".bench/vllm_serve.log"))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="lmcache-serve-"))
    config_file = workdir / "cpu-offload.yaml"
    config_file.write_text(SEED_CONFIG)
    env = {
        **os.environ,
        "LMCACHE_CONFIG_FILE": str(config_file),
        "VLLM_USE_FLASHINFER_SAMPLER": "0",
    }
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        str(args.model),
        "--served-model-name",
        "llama",
        "--load-format",
        "dummy",
        "--skip-tokenizer-init",
        "--max-model-len",
        str(args.max_model_len),
        "--no-enable-prefix-caching",
        "--port",
        str(args.port),
        "--kv-transfer-config",
        KV_TRANSFER,
    ]
    args.log.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{args.port}"
    rng = random.Random(0)
    prompt = [rng.randrange(1000, 120000) for _ in range(args.prompt_tokens)]
    other = [rng.randrange(1000, 120000) for _ in range(args.prompt_tokens)]
    with args.log.open("wb") as log:
        started = time.monotonic()
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, server, deadline_s=480)
            startup = time.monotonic() - started
            ttft(url, "llama", [rng.randrange(1000, 120000) for _ in range(64)])  # warm-up
            cold = ttft(url, "llama", prompt)
            warm = ttft(url, "llama", prompt)
            cold_other = ttft(url, "llama", other)
        finally:
            server.terminate()
            server.wait(timeout=60)
    lines = [
        line
        for line in args.log.read_text(errors="replace").splitlines()
        if "LMCache hit tokens" in line or "Storing KV cache for" in line
    ]
    result = {
        "command": " ".join(command),
        "startup_s": startup,
        "prompt_tokens": args.prompt_tokens,
        "cold_ttft_s": cold,
        "warm_ttft_s": warm,
        "cold_other_prompt_ttft_s": cold_other,
        "speedup": cold / warm,
        "lmcache_log_lines": lines,
    }
    print(
        f"Cold TTFT: {cold:.3f} s\nWarm TTFT: {warm:.3f} s\nTTFT improvement: "
        f"{cold - warm:.3f} s ({cold / warm:.1f}x faster); another cold prompt: {cold_other:.3f} s"
    )
    print("\n".join(lines[-12:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
