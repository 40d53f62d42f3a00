"""`vllm serve` for the real-node e2e tests, which have no GPU: a stand-in built from vLLM's own
engine parts, with CPU KV tensors instead of a model.

vLLM cannot serve a model on a CPU-only machine, so this serves the part of `vllm serve` an
LMCacheDeployment's pod depends on, through the code path vLLM uses:

- vLLM's `Scheduler`, which creates the scheduler-side KV connector from --kv-transfer-config
  (`LMCacheConnectorV1`: vLLM's built-in wrapper, which loads `LMCacheConnectorV1Impl` from the
  installed `lmcache`, ours in the engine image);
- the worker-side connector, made by vLLM's `ensure_kv_transfer_initialized` in a one-rank group
  as a vLLM worker does, registered with paged KV tensors laid out as vLLM allocates them;
- every step inside vLLM's `KVConnectorModelRunnerMixin` lifecycle, each layer between
  `wait_for_layer_load` and `save_kv_layer` as vLLM's attention wrapper calls them;
- the "model" writes random KV for the tokens it computes (each process its own random stream),
  so KV that two pods hold identically can only have travelled through the connector.

The geometry (layers, KV heads, head size, dtype) comes from the model's config.json, as in vLLM.
As in vLLM V1 the API server (this process) runs the engine core in a child process, and
`GET /health` answers 200 only while the engine core answers. Endpoints: `GET /health`,
`GET /v1/models`, `POST /v1/completions` with token ids (`{"prompt": [1, 2, ...],
"max_tokens": 1}`); the response has vLLM's `usage.prompt_tokens_details.cached_tokens` and, for
the tests, `kv_block_sha256`: the sha256 of each full 16-token block of the prompt's KV as this
pod's KV cache holds it after the prefill.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any

log = logging.getLogger("vllm-standin")
BLOCK = 16  # vLLM's default block size on GPUs
SAMPLED_TOKEN = 7


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The `vllm serve` flags the operator renders; others are reported and ignored."""
    p = argparse.ArgumentParser(prog="vllm serve (e2e stand-in)")
    p.add_argument("model")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-transfer-config", default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--num-gpu-blocks-override", type=int, default=1024)
    p.add_argument("--engine-core-fds", default=None, help=argparse.SUPPRESS)
    return p.parse_known_args(argv)


# --- the engine core (child process) ------------------------------------------------------------


class EngineCore:
    """vLLM's scheduler and a worker's connector around CPU paged KV, stepped like vLLM's core."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        from vllm.config import (
            CacheConfig,
            DeviceConfig,
            KVTransferConfig,
            ModelConfig,
            ParallelConfig,
            SchedulerConfig,
            VllmConfig,
            set_current_vllm_config,
        )
        from vllm.distributed.kv_transfer.kv_transfer_state import (
            ensure_kv_transfer_initialized,
            get_kv_transfer_group,
        )
        from vllm.distributed.parallel_state import (
            ensure_model_parallel_initialized,
            init_distributed_environment,
        )
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        if args.tensor_parallel_size != 1:
            raise SystemExit("the e2e stand-in runs one rank: --tensor-parallel-size=1 only")
        transfer = json.loads(args.kv_transfer_config) if args.kv_transfer_config else None
        model = ModelConfig(
            model=args.model, seed=0, skip_tokenizer_init=True, max_model_len=args.max_model_len
        )
        self.config = VllmConfig(
            model_config=model,
            scheduler_config=SchedulerConfig(
                max_num_seqs=16,
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_model_len=model.max_model_len,
                enable_chunked_prefill=True,
                is_encoder_decoder=False,
                async_scheduling=False,  # steps run one after the other here
            ),
            cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
            kv_transfer_config=KVTransferConfig(**transfer) if transfer else None,
            device_config=DeviceConfig("cpu"),
            parallel_config=ParallelConfig(),
        )
        parallel = self.config.parallel_config
        layers = model.get_num_layers(parallel)
        heads, head_size = model.get_num_kv_heads(parallel), model.get_head_size()
        assert isinstance(model.dtype, torch.dtype)  # resolved from config.json by now
        self.dtype = model.dtype
        num_blocks = args.num_gpu_blocks_override
        self.config.cache_config.num_gpu_blocks = num_blocks
        names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
        kv_cache_config = KVCacheConfig(
            num_blocks=num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[
                KVCacheGroupSpec(
                    names,
                    FullAttentionSpec(
                        block_size=BLOCK, num_kv_heads=heads, head_size=head_size, dtype=self.dtype
                    ),
                )
            ],
        )
        init_none_hash(sha256)
        with set_current_vllm_config(self.config):
            # What a vLLM worker does before its connector exists: a (here one-rank) group.
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, backend="gloo")
            ensure_model_parallel_initialized(1, 1)
            ensure_kv_transfer_initialized(self.config, kv_cache_config)
        self.worker = get_kv_transfer_group() if transfer else None
        # vLLM's GPU layout per layer: [num_blocks, 2 (K, V), block_size, kv_heads, head_size].
        self.layers = {
            n: torch.zeros(num_blocks, 2, BLOCK, heads, head_size, dtype=self.dtype) for n in names
        }
        if self.worker is not None:
            self.worker.register_kv_caches(self.layers)
        self.scheduler = Scheduler(
            vllm_config=self.config,
            kv_cache_config=kv_cache_config,
            structured_output_manager=StructuredOutputManager(self.config),
            block_size=BLOCK,
            log_stats=True,
        )
        self.blocks: dict[str, list[int]] = {}
        self.cached: dict[str, int] = {}  # tokens not computed at the first schedule (vLLM's
        # num_cached_tokens: prefix-cache hits plus what the connector loads)
        self.random = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        self.served = 0

    def complete(self, prompt: list[int], max_tokens: int) -> dict[str, Any]:
        """Run one request to completion, as vLLM's engine core steps it."""
        from vllm import SamplingParams
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher
        from vllm.v1.request import Request

        self.served += 1
        req_id = f"cmpl-{self.served}"
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        request = Request(
            request_id=req_id,
            prompt_token_ids=prompt,
            sampling_params=params,
            pooling_params=None,
            block_hasher=get_request_block_hasher(BLOCK, sha256),
        )
        self.scheduler.add_request(request)
        digests: list[str] = []
        for _ in range(10 * (len(prompt) + max_tokens)):
            if req_id not in self.scheduler.requests:
                break
            digests = self.step(req_id, len(prompt)) or digests
        else:
            raise RuntimeError(f"{req_id} did not finish")
        return {
            "request_id": req_id,
            "output_token_ids": list(request.output_token_ids),
            "cached_tokens": self.cached.pop(req_id),
            "kv_block_sha256": digests,
        }

    def step(self, watched: str, prompt_len: int) -> list[str]:
        """schedule → execute → update_from_output; the KV digests of `watched` once its prefill
        is done (before the scheduler can free its blocks)."""
        output = self.scheduler.schedule()
        for new in output.scheduled_new_reqs:
            self.blocks[new.req_id] = list(new.block_ids[0])
            self.cached.setdefault(new.req_id, new.num_computed_tokens)
        cached = output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self.blocks[req_id] = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                self.blocks[req_id].extend(new_blocks[0])
        starts = {new.req_id: new.num_computed_tokens for new in output.scheduled_new_reqs}
        starts.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        runner_output = self.execute(output, starts)
        digests = []
        if watched in starts and starts[watched] < prompt_len <= (
            starts[watched] + output.num_scheduled_tokens[watched]
        ):
            digests = self.digests(watched, prompt_len)
        self.scheduler.update_from_output(output, runner_output)
        for req_id in output.finished_req_ids:
            self.blocks.pop(req_id, None)
        return digests

    def execute(self, output: Any, starts: dict[str, int]) -> Any:
        """The model runner's part of a step, inside vLLM's connector lifecycle."""
        import torch
        from vllm.forward_context import set_forward_context
        from vllm.v1.outputs import ModelRunnerOutput
        from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

        attn_metadata: Any = None  # no attention backend: the KV below is the "attention"
        with (
            set_forward_context(attn_metadata, self.config),
            KVConnectorModelRunnerMixin.maybe_get_kv_connector_output(output) as kv_output,
        ):
            for name, paged in self.layers.items():
                if self.worker is not None:
                    self.worker.wait_for_layer_load(name)
                for req_id, start in starts.items():
                    slots = self.slots(req_id, start, start + output.num_scheduled_tokens[req_id])
                    shape = (len(slots), 2, paged.shape[3], paged.shape[4])
                    kv = torch.randn(shape, generator=self.random).to(self.dtype)
                    paged[slots // BLOCK, :, slots % BLOCK] = kv
                if self.worker is not None:
                    self.worker.save_kv_layer(name, paged, attn_metadata)
        req_ids = list(output.num_scheduled_tokens)
        sampled = []
        for r in req_ids:
            request = self.scheduler.requests[r]
            done = starts[r] + output.num_scheduled_tokens[r] >= request.num_tokens
            sampled.append([SAMPLED_TOKEN] if done else [])
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output=None,
            kv_connector_output=kv_output,
        )

    def slots(self, req_id: str, start: int, end: int) -> Any:
        import torch

        positions = torch.arange(start, end)
        table = torch.tensor(self.blocks[req_id])
        return table[positions // BLOCK] * BLOCK + positions % BLOCK

    def digests(self, req_id: str, prompt_len: int) -> list[str]:
        out = []
        for i in range(prompt_len // BLOCK):
            h = hashlib.sha256()
            for paged in self.layers.values():
                h.update(paged[self.blocks[req_id][i]].contiguous().view(-1).numpy().tobytes())
            out.append(h.hexdigest())
        return out

    def shutdown(self) -> None:
        from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

        self.scheduler.shutdown()
        ensure_kv_transfer_shutdown()


def engine_core_main(args: argparse.Namespace) -> int:
    """Serve the API server's JSON-line requests on the pipe fds it passed."""
    rfd, wfd = (int(fd) for fd in args.engine_core_fds.split(","))
    rx, tx = os.fdopen(rfd, "r"), os.fdopen(wfd, "w")

    def reply(**msg: Any) -> None:
        tx.write(json.dumps(msg) + "\n")
        tx.flush()

    core = EngineCore(args)
    reply(id=0, ready=True, pid=os.getpid())
    for line in rx:
        msg = json.loads(line)
        if msg["op"] == "ping":
            reply(id=msg["id"], ok=True)
        elif msg["op"] == "complete":
            try:
                reply(id=msg["id"], **core.complete(msg["prompt"], msg["max_tokens"]))
            except Exception as e:
                log.exception("request failed")
                reply(id=msg["id"], error=f"{type(e).__name__}: {e}")
        elif msg["op"] == "shutdown":
            break
    core.shutdown()
    return 0


# --- the API server (PID 1 of the pod) ----------------------------------------------------------


class CoreClient:
    """The API server's handle on the engine core: one request at a time over two pipes."""

    def __init__(self, argv: list[str]) -> None:
        to_core_r, self._to_core = os.pipe()
        self._from_core, from_core_w = os.pipe()
        fds = f"--engine-core-fds={to_core_r},{from_core_w}"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *argv, fds], pass_fds=(to_core_r, from_core_w)
        )
        os.close(to_core_r)
        os.close(from_core_w)
        self._tx: IO[str] = os.fdopen(self._to_core, "w")
        self._rx: IO[str] = os.fdopen(self._from_core, "r")
        self._lock = threading.Lock()
        self._next = 0
        self.completing = False  # a completion in flight answers for the engine's health

    def wait_ready(self) -> int:
        """The engine core's pid once it is initialized; exits like vLLM if it failed."""
        line = self._rx.readline()
        if not line:
            code = self.proc.wait()
            log.error("engine core failed to start (exit code %d)", code)
            sys.exit(code or 1)
        return int(json.loads(line)["pid"])

    def healthy(self) -> bool:
        """The engine core process runs and answers a ping within 2 s (or is busy completing)."""
        return self.proc.poll() is None and (
            self.completing or self.call(2.0, op="ping") is not None
        )

    def call(self, timeout: float, **msg: Any) -> dict[str, Any] | None:
        """The engine core's reply, or None when it did not answer within `timeout` seconds."""
        if not self._lock.acquire(timeout=timeout):
            return None
        try:
            self.completing = msg["op"] == "complete"
            self._next += 1
            self._tx.write(json.dumps({"id": self._next, **msg}) + "\n")
            self._tx.flush()
            while select.select([self._rx], [], [], timeout)[0]:
                line = self._rx.readline()
                if not line:
                    return None
                reply: dict[str, Any] = json.loads(line)
                if reply["id"] == self._next:  # earlier ids: answers to calls that timed out
                    return reply
            return None
        finally:
            self.completing = False
            self._lock.release()


def serve(args: argparse.Namespace, argv: list[str]) -> int:
    core = CoreClient(argv)
    pid = core.wait_ready()
    log.info(
        "engine core ready (pid %d); serving %s on %s:%d", pid, args.model, args.host, args.port
    )
    name = args.served_model_name or args.model

    class Handler(BaseHTTPRequestHandler):
        def send(self, code: int, body: dict[str, Any] | None = None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self.send(200 if core.healthy() else 503)
            elif self.path == "/v1/models":
                self.send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            else:
                self.send(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            if self.path != "/v1/completions":
                self.send(404, {"error": f"no route {self.path}"})
                return
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            prompt = body.get("prompt")
            if not (
                isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)
            ):
                self.send(400, {"error": "prompt: a non-empty list of token ids (no tokenizer)"})
                return
            max_tokens = int(body.get("max_tokens", 1))
            result = core.call(120.0, op="complete", prompt=prompt, max_tokens=max_tokens)
            if result is None or "error" in result:
                self.send(500, {"error": (result or {}).get("error", "engine core not answering")})
                return
            self.send(
                200,
                {
                    "id": result["request_id"],
                    "object": "text_completion",
                    "model": name,
                    "choices": [
                        {
                            "index": 0,
                            "text": "",
                            "token_ids": result["output_token_ids"],
                            "finish_reason": "length",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": len(prompt),
                        "completion_tokens": len(result["output_token_ids"]),
                        "total_tokens": len(prompt) + len(result["output_token_ids"]),
                        "prompt_tokens_details": {"cached_tokens": result["cached_tokens"]},
                    },
                    "kv_block_sha256": result["kv_block_sha256"],
                },
            )

        def log_message(self, format: str, *args: Any) -> None:
            if "/health" not in self.requestline:
                log.info("%s %s", self.address_string(), format % args)

    server = ThreadingHTTPServer((args.host, args.port), Handler)

    def stop(signum: int, _frame: object) -> None:
        # As vLLM on SIGTERM: stop serving, shut the engine (and its connector) down, exit 0.
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    core.call(5.0, op="shutdown")
    try:
        core.proc.wait(30)
    except subprocess.TimeoutExpired:
        core.proc.kill()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    args, ignored = parse_args(argv)
    if args.engine_core_fds:
        return engine_core_main(args)
    if ignored:
        log.warning("ignoring vllm serve arguments the stand-in does not implement: %s", ignored)
    return serve(args, [a for a in argv if a not in ignored])


if __name__ == "__main__":
    sys.exit(main())
