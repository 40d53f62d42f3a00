"""A real vLLM ``Scheduler`` and real worker-side connector around CPU paged KV tensors.

The rig plays vLLM's model runner: inside vLLM's own ``KVConnectorModelRunnerMixin``
lifecycle (bind metadata, ``start_load_kv``, forward, ``wait_for_save``, load errors) it writes
the KV the model would compute for the scheduled tokens, and it feeds the connector output back
through the scheduler's ``update_from_output``.
The KV of a token is a pure function of (token id, position), so after every step each
computed token's KV, loaded or computed, can be checked slot for slot. The model itself
is a ``config.json`` only: no weights are needed, and nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer import kv_transfer_state
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
)
from vllm.forward_context import set_forward_context
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

from lmcache.integration.vllm.paged import PagedLayout
from lmcache.integration.vllm.shared import SharedEngine, find

BLOCK = 16
CHUNK = 32
HEADS = 2
HEAD_SIZE = 8
LAYERS = 2
EOS = 2
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HEADS * 2 * HEAD_SIZE,
    "intermediate_size": 64,
    "num_attention_heads": HEADS * 2,
    "num_key_value_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float16",
    "bos_token_id": 1,
    "eos_token_id": EOS,
}


NO_CUDA = "needs a CUDA device (this machine has none)"
CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)],
)
DEVICES = ["cpu", CUDA]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps(MODEL_CONFIG))
    init_none_hash(sha256)
    return path


def make_vllm_config(
    model_dir: Path,
    extra: dict[str, Any] | None = None,
    max_num_batched_tokens: int = 64,
    connector: str = "LMCacheConnectorV1",
    kv_role: Literal["kv_producer", "kv_both", "kv_consumer"] = "kv_both",
    module_path: str | None = None,
    executor_backend: str | None = None,
    async_scheduling: bool = False,
) -> VllmConfig:
    model = ModelConfig(model=str(model_dir), dtype="float16", seed=0, skip_tokenizer_init=True)
    return VllmConfig(
        model_config=model,
        scheduler_config=SchedulerConfig(
            max_num_seqs=16,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=4096,
            enable_chunked_prefill=True,
            is_encoder_decoder=False,
            async_scheduling=async_scheduling,
        ),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
        kv_transfer_config=KVTransferConfig(
            kv_connector=connector,
            kv_connector_module_path=module_path,
            kv_role=kv_role,
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={
                "lmcache.chunk_size": CHUNK,
                "lmcache.max_local_cpu_size": 0.01,
                **(extra or {}),
            },
        ),
        device_config=DeviceConfig("cpu"),
        parallel_config=ParallelConfig(distributed_executor_backend=executor_backend),
    )


def make_paged(
    layout: PagedLayout, num_blocks: int, device: str = "cpu", hnd: bool = False
) -> torch.Tensor:
    """One layer's paged tensor as vLLM allocates it (HND: heads before tokens in memory)."""
    if layout is PagedLayout.MLA:
        return torch.zeros(num_blocks, BLOCK, HEAD_SIZE, device=device)
    if layout is PagedLayout.KV_FIRST:
        return torch.zeros(2, num_blocks, BLOCK, HEADS, HEAD_SIZE, device=device)
    if hnd:
        raw = torch.zeros(num_blocks, 2, HEADS, BLOCK, HEAD_SIZE, device=device)
        return raw.permute(0, 1, 3, 2, 4)
    return torch.zeros(num_blocks, 2, BLOCK, HEADS, HEAD_SIZE, device=device)


def token_slice(paged: torch.Tensor, layout: PagedLayout, slot: int) -> torch.Tensor:
    """The KV of one slot, indexed plainly (independent of the code under test)."""
    block, offset = divmod(slot, BLOCK)
    if layout is PagedLayout.MLA:
        return paged[block, offset]
    if layout is PagedLayout.KV_FIRST:
        return paged[:, block, offset]
    return paged[block, :, offset]


def model_kv(token: int, position: int, layer: int, like: torch.Tensor) -> torch.Tensor:
    """What the 'model' computes for a token: exact small integers in float32."""
    base = float(((token * 31 + position * 7 + layer * 13) % 4093) * 1024)
    pattern = torch.arange(like.numel(), dtype=like.dtype, device=like.device) % 1024
    return (pattern + base).view(like.shape)


@contextmanager
def worker_agent(connector: KVConnectorBase_V1) -> Iterator[None]:
    """Make ``connector`` the process's worker-side connector, as vLLM's
    ``ensure_kv_transfer_initialized`` does in a worker (which needs a TP group)."""
    previous = kv_transfer_state._KV_CONNECTOR_AGENT
    kv_transfer_state._KV_CONNECTOR_AGENT = connector
    try:
        yield
    finally:
        kv_transfer_state._KV_CONNECTOR_AGENT = previous


@pytest.fixture
def lmcache_log() -> Iterator[list[str]]:
    """The ``lmcache`` logger's messages (it does not propagate to the root logger)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.INFO)
    logger = logging.getLogger("lmcache")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(level)


@dataclass
class Rig:
    """vLLM's scheduler + worker connector + CPU paged caches, stepped like the engine core."""

    scheduler: Scheduler
    worker: KVConnectorBase_V1
    layers: dict[str, torch.Tensor]
    layout: PagedLayout
    blocks: dict[str, list[int]] = field(default_factory=dict)
    prompts: dict[str, list[int]] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)
    load_errors: list[set[int]] = field(default_factory=list)

    @property
    def shared(self) -> SharedEngine:
        transfer = self.scheduler.vllm_config.kv_transfer_config
        assert transfer is not None
        shared = find(str(transfer.engine_id))
        assert shared is not None
        return shared

    @staticmethod
    def make_request(request_id: str, prompt: list[int], max_tokens: int = 1) -> Request:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        params.update_from_generation_config({}, EOS)
        return Request(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling_params=params,
            pooling_params=None,
            block_hasher=get_request_block_hasher(BLOCK, sha256),
        )

    def add(self, request_id: str, prompt: list[int], max_tokens: int = 1) -> Request:
        request = self.make_request(request_id, prompt, max_tokens)
        self.scheduler.add_request(request)
        self.prompts[request_id] = prompt
        return request

    def schedule(self) -> SchedulerOutput:
        output = self.scheduler.schedule()
        for new in output.scheduled_new_reqs:
            if new.req_id in self.blocks:  # newer vLLM sends a resumed request as new
                self.resumed.append(new.req_id)
            self.blocks[new.req_id] = list(new.block_ids[0])
        cached = output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self.resumed.append(req_id)
                self.blocks[req_id] = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                self.blocks[req_id].extend(new_blocks[0])
        return output

    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        """The model runner's part of a step, inside vLLM's own connector lifecycle
        (``KVConnectorModelRunnerMixin``: bind, start_load_kv, forward, wait_for_save,
        load errors, events, clear); returns the output for ``update_from_output``."""
        starts = {new.req_id: new.num_computed_tokens for new in output.scheduled_new_reqs}
        cached = output.scheduled_cached_reqs
        starts.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        with (
            worker_agent(self.worker),
            set_forward_context(None, self.scheduler.vllm_config),
            KVConnectorModelRunnerMixin.maybe_get_kv_connector_output(output) as kv_output,
        ):
            for req_id, start in starts.items():
                for layer_name in self.layers:  # as each attention layer does on entry
                    self.worker.wait_for_layer_load(layer_name)
                self.compute(req_id, start, start + output.num_scheduled_tokens[req_id])
        assert kv_output is not None
        assert kv_output.kv_cache_events is None
        self.load_errors.append(set(kv_output.invalid_block_ids))
        req_ids = list(output.num_scheduled_tokens)
        sampled = [
            [7] if starts[r] + output.num_scheduled_tokens[r] >= len(self.tokens(r)) else []
            for r in req_ids
        ]
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output=None,
            kv_connector_output=kv_output,
        )

    def step(self) -> SchedulerOutput:
        output = self.schedule()
        self.scheduler.update_from_output(output, self.execute(output))
        return output

    def run(self, max_steps: int = 50) -> None:
        """Step until every request is finished."""
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                return
            self.step()
        raise AssertionError(f"requests still unfinished after {max_steps} steps")

    def slot(self, req_id: str, position: int) -> int:
        return self.blocks[req_id][position // BLOCK] * BLOCK + position % BLOCK

    def tokens(self, req_id: str) -> list[int]:
        request = self.scheduler.requests.get(req_id)
        return list(request.all_token_ids) if request else self.prompts[req_id]

    def compute(self, req_id: str, start: int, end: int) -> None:
        tokens = self.tokens(req_id)
        for layer, paged in enumerate(self.layers.values()):
            for position in range(start, end):
                view = token_slice(paged, self.layout, self.slot(req_id, position))
                view.copy_(model_kv(tokens[position], position, layer, view))

    def check(self, req_id: str, start: int, end: int) -> None:
        """Every token in ``[start, end)`` holds exactly the KV the model computes for it."""
        tokens = self.tokens(req_id)
        for layer, paged in enumerate(self.layers.values()):
            for position in range(start, end):
                view = token_slice(paged, self.layout, self.slot(req_id, position))
                expected = model_kv(tokens[position], position, layer, view)
                assert torch.equal(view, expected), (req_id, position, layer)

    def evict_gpu(self) -> None:
        """Forget vLLM's prefix cache and wipe the paged tensors: only LMCache can help now."""
        assert self.scheduler.reset_prefix_cache()
        for paged in self.layers.values():
            paged.fill_(-1)

    def close_worker(self) -> None:
        """vLLM 0.25's built-in wrapper forwards no ``shutdown``; close our side directly."""
        impl = getattr(self.worker, "_lmcache_engine", self.worker)
        impl.shutdown()

    def abort(self, req_id: str) -> None:
        self.scheduler.finish_requests(req_id, RequestStatus.FINISHED_ABORTED)


def make_rig(
    vllm_config: VllmConfig,
    layout: PagedLayout = PagedLayout.BLOCK_FIRST,
    num_blocks: int = 256,
    device: str = "cpu",
) -> Rig:
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)],
                FullAttentionSpec(
                    block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_SIZE, dtype=torch.float32
                ),
            )
        ],
    )
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    worker = KVConnectorFactory.create_connector(
        vllm_config, KVConnectorRole.WORKER, kv_cache_config
    )
    names = kv_cache_config.kv_cache_groups[0].layer_names
    layers = {name: make_paged(layout, num_blocks, device) for name in names}
    worker.register_kv_caches(layers)
    async_scheduling = vllm_config.scheduler_config.async_scheduling
    scheduler = (AsyncScheduler if async_scheduling else Scheduler)(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        log_stats=True,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK,
    )
    return Rig(scheduler, worker, layers, layout)


RigFactory = Callable[..., Rig]


@pytest.fixture
def rig_factory(model_dir: Path) -> Iterator[RigFactory]:
    rigs: list[Rig] = []

    def make(
        extra: dict[str, Any] | None = None,
        layout: PagedLayout = PagedLayout.BLOCK_FIRST,
        num_blocks: int = 256,
        device: str = "cpu",
        **config: Any,
    ) -> Rig:
        vllm_config = make_vllm_config(model_dir, extra, **config)
        rig = make_rig(vllm_config, layout, num_blocks, device)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.scheduler.shutdown()
        rig.close_worker()
