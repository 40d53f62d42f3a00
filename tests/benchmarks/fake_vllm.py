"""A stand-in for ``vllm serve`` (run as ``python -m tests.benchmarks.fake_vllm serve MODEL ...``).

Mock, because no GPU is here: it speaks the part of vLLM's OpenAI-compatible API the serving
benchmark uses (streamed ``/v1/completions`` of token-id prompts with ``return_token_ids`` and
usage, ``/health``, ``/reset_prefix_cache``, the two prefix-cache hit counters of ``/metrics``)
and keeps a toy prefix cache: a prompt seen before is a GPU hit until the cache is reset; with an
offloading flag (``--kv-transfer-config`` or ``--kv-offloading-size``) it is then an external hit.
The greedy output is a function of the prompt.

Faults for the tests: ``FAKE_VLLM_FAIL_FLAG`` (exit at once when that flag is on the command
line) and ``FAKE_VLLM_CORRUPT_PATH`` (when ``PYTHONPATH`` contains it, outputs served from the
external store are wrong, as with KV loaded from the wrong place).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class State:
    def __init__(self, offloads: bool, corrupt: bool) -> None:
        self.lock = threading.Lock()
        self.gpu: set[tuple[int, ...]] = set()
        self.external: set[tuple[int, ...]] = set()
        self.offloads = offloads
        self.corrupt = corrupt
        self.gpu_hits = 0
        self.external_hits = 0

    def serve(self, prompt: tuple[int, ...]) -> bool:
        """Account one prompt's hits; True when its KV came from the external store."""
        with self.lock:
            from_external = False
            if prompt in self.gpu:
                self.gpu_hits += len(prompt) - 1
            elif prompt in self.external:
                self.external_hits += len(prompt) - 1
                from_external = True
            self.gpu.add(prompt)
            if self.offloads:
                self.external.add(prompt)
            return from_external


def output(prompt: tuple[int, ...], n: int, wrong: bool) -> list[int]:
    base = sum(prompt) + (7 if wrong else 0)
    return [1000 + (base * 31 + i) % 5000 for i in range(n)]


def handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write("fake-vllm: " + format % args + "\n")

        def send_text(self, status: int, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/health":
                self.send_text(200, "")
            elif self.path == "/metrics":
                with state.lock:
                    self.send_text(
                        200,
                        "# TYPE vllm:prefix_cache_hits_total counter\n"
                        f'vllm:prefix_cache_hits_total{{engine="0"}} {float(state.gpu_hits)}\n'
                        f'vllm:external_prefix_cache_hits_total{{engine="0"}} '
                        f"{float(state.external_hits)}\n",
                    )
            else:
                self.send_text(404, "not found")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path.startswith("/reset_prefix_cache"):
                with state.lock:
                    state.gpu.clear()
                self.send_text(200, "")
                return
            if self.path != "/v1/completions" or not body.get("stream"):
                self.send_text(400, "only streamed completions")
                return
            prompt = tuple(body["prompt"])
            from_external = state.serve(prompt)
            if state.offloads:
                where = "external hit" if from_external else "miss"
                print(f"fake-vllm: LMCache/offload {where}, {len(prompt)} tokens", flush=True)
            tokens = output(prompt, body["max_tokens"], from_external and state.corrupt)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for i, token in enumerate(tokens):
                choice: dict[str, Any] = {"index": 0, "text": "", "finish_reason": None}
                if body.get("return_token_ids"):
                    choice["token_ids"] = [token]
                    if i == 0:
                        choice["prompt_token_ids"] = list(prompt)
                self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            usage = {"prompt_tokens": len(prompt), "completion_tokens": len(tokens)}
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

    return Handler


def main(argv: list[str]) -> int:
    fail_flag = os.environ.get("FAKE_VLLM_FAIL_FLAG")
    if fail_flag and fail_flag in argv:
        print(f"fake-vllm: failing on purpose ({fail_flag})", flush=True)
        return 1
    port = int(argv[argv.index("--port") + 1])
    offloads = "--kv-transfer-config" in argv or "--kv-offloading-size" in argv
    corrupt_path = os.environ.get("FAKE_VLLM_CORRUPT_PATH", "")
    corrupt = bool(corrupt_path) and corrupt_path in os.environ.get("PYTHONPATH", "")
    server = ThreadingHTTPServer(("127.0.0.1", port), handler(State(offloads, corrupt)))
    print(f"fake-vllm: serving on {port}, offloads={offloads}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
