"""A real vLLM ``Scheduler`` and real worker-side connector around CPU paged KV tensors.

The rig plays vLLM's model runner: inside vLLM's own ``KVConnectorModelRunnerMixin``
lifecycle (bind metadata, ``start_load_kv``, forward, ``wait_for_save``, load errors) it writes
the KV the model would compute for the scheduled tokens, and it feeds the connector output back
through the scheduler's ``update_from_output``.

The "model" is a config.json only (no weights). Its KV is exact small integers: layer 0 is a
function of (token id, position); every deeper layer also reads the KV of all earlier
positions one layer down, as attention does. So KV computed over a missing or wrong context
(a load that left zeros, another prompt's chunk) is wrong in deeper layers, and every check
against :func:`oracle` catches it: in the paged cache, and in what the engine stored.
"""

from __future__ import annotations

import json
import logging
import os
import time
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
    KVEventsConfig,
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
from vllm.v1.engine import FinishReason
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

from lmcache import LMCacheEngine
from lmcache.integration.vllm.paged import PagedLayout
from lmcache.integration.vllm.worker import WorkerConnector
from lmcache.keys import PLAIN, KVContext

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
    policy: Literal["fail", "recompute"] = "fail",
    tensor_parallel_size: int = 1,
    engine_id: str | None = None,
    kv_events: tuple[str, str] | None = None,
) -> VllmConfig:
    """``kv_events``: vLLM's event publisher on (PUB endpoint, replay endpoint)."""
    model = ModelConfig(model=str(model_dir), dtype="float16", seed=0, skip_tokenizer_init=True)
    parallel = ParallelConfig(
        distributed_executor_backend="mp" if tensor_parallel_size > 1 else executor_backend,
        tensor_parallel_size=tensor_parallel_size,
    )
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
            kv_load_failure_policy=policy,
            **({"engine_id": engine_id} if engine_id else {}),
            kv_connector_extra_config={
                "lmcache.chunk_size": CHUNK,
                "lmcache.max_local_cpu_size": 0.01,
                **(extra or {}),
            },
        ),
        device_config=DeviceConfig("cpu"),
        parallel_config=parallel,
        kv_events_config=None
        if kv_events is None
        else KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=kv_events[0],
            replay_endpoint=kv_events[1],
        ),
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


MOD = 4093
"""KV values are ``pattern + v * 1024`` with ``v < MOD``: exact in float32."""


def layer_values(
    ids: torch.Tensor, positions: torch.Tensor, layer: int, context: torch.Tensor, rank: int
) -> torch.Tensor:
    """``v`` of one layer's KV; each TP rank holds another shard, so another value."""
    return (ids * 31 + positions * 7 + layer * 13 + rank * 17 + context) % MOD


def oracle(tokens: list[int], layers: int = LAYERS, rank: int = 0) -> torch.Tensor:
    """``v[layer, position]`` of the true KV of ``tokens``: what a forward pass over the
    whole sequence with no cache computes."""
    ids = torch.tensor(tokens, dtype=torch.long)
    positions = torch.arange(len(tokens), dtype=torch.long)
    values = torch.empty(layers, len(tokens), dtype=torch.long)
    context = torch.zeros(len(tokens), dtype=torch.long)
    for layer in range(layers):
        values[layer] = layer_values(ids, positions, layer, context, rank)
        context = torch.cumsum(values[layer], 0) - values[layer]  # sum over earlier positions
    return values


def kv_of(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[n, *slot_shape]`` KV for ``n`` values, each slot ``pattern + v * 1024``."""
    pattern = torch.arange(like[0].numel(), dtype=like.dtype, device=like.device) % 1024
    pattern = pattern.view(like.shape[1:])
    return pattern + values.to(like.dtype).to(like.device).view(-1, *[1] * pattern.dim()) * 1024


class SlotIO:
    """Reads and writes whole slots of one paged layer by slot id, written independently of
    the code under test (plain indexing per layout)."""

    def __init__(self, layout: PagedLayout) -> None:
        self.layout = layout

    def get(self, paged: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        slots = slots.to(paged.device)
        blocks, offsets = slots // BLOCK, slots % BLOCK
        if self.layout is PagedLayout.KV_FIRST:
            return paged[:, blocks, offsets].movedim(1, 0)
        if self.layout is PagedLayout.BLOCK_FIRST:
            return paged[blocks, :, offsets]
        return paged[blocks, offsets]

    def set(self, paged: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor) -> None:
        slots = slots.to(paged.device)
        blocks, offsets = slots // BLOCK, slots % BLOCK
        if self.layout is PagedLayout.KV_FIRST:
            paged[:, blocks, offsets] = kv.movedim(0, 1)
        elif self.layout is PagedLayout.BLOCK_FIRST:
            paged[blocks, :, offsets] = kv
        else:
            paged[blocks, offsets] = kv

    def first_values(self, paged: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``v`` of each slot (its first element is ``v * 1024``)."""
        kv = self.get(paged, slots).flatten(1)[:, 0]
        return (kv.double() / 1024).round().long().cpu()

    def compute(
        self,
        layers: list[torch.Tensor],
        tokens: list[int],
        slots: torch.Tensor,
        start: int,
        rank: int = 0,
    ) -> None:
        """The forward pass over ``tokens[start:]`` (token ``i`` at ``slots[i]``): each layer
        reads the KV of every earlier position one layer down *from the paged cache*
        (loaded or computed)."""
        end = len(tokens)
        if end <= start:
            return
        ids = torch.tensor(tokens[start:], dtype=torch.long)
        positions = torch.arange(start, end, dtype=torch.long)
        context = torch.zeros(end - start, dtype=torch.long)
        for layer, paged in enumerate(layers):
            values = layer_values(ids, positions, layer, context, rank)
            self.set(paged, slots[start:], kv_of(values, self.get(paged, slots[:1])))
            below = self.first_values(paged, slots)
            context = (torch.cumsum(below, 0) - below)[start:]

    def wrong(
        self, layers: list[torch.Tensor], tokens: list[int], slots: torch.Tensor, rank: int = 0
    ) -> str | None:
        """Where the KV at ``slots`` differs from a forward pass over ``tokens`` (None: it is
        exact everywhere)."""
        truth = oracle(tokens, rank=rank)
        for layer, paged in enumerate(layers):
            got = self.get(paged, slots)
            bad = (got != kv_of(truth[layer], got)).flatten(1).any(1).nonzero()
            if bad.numel():
                return f"layer {layer} wrong at positions {bad.flatten().tolist()[:20]}"
        return None


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
    finished: dict[str, FinishReason] = field(default_factory=dict)

    @property
    def connector(self) -> WorkerConnector:
        impl = getattr(self.worker, "_lmcache_engine", None) or self.worker._impl  # type: ignore[attr-defined]
        connector = impl.worker
        assert isinstance(connector, WorkerConnector)
        return connector

    @property
    def engine(self) -> LMCacheEngine:
        return self.connector.engine

    @property
    def io(self) -> SlotIO:
        return SlotIO(self.layout)

    @staticmethod
    def make_request(
        request_id: str, prompt: list[int], max_tokens: int = 1, **extra: Any
    ) -> Request:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        params.update_from_generation_config({}, EOS)
        return Request(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling_params=params,
            pooling_params=None,
            block_hasher=get_request_block_hasher(BLOCK, sha256),
            **extra,
        )

    def add(self, request_id: str, prompt: list[int], max_tokens: int = 1, **extra: Any) -> Request:
        request = self.make_request(request_id, prompt, max_tokens, **extra)
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
        finished transfers, load errors, events, clear); returns the output for
        ``update_from_output``."""
        starts = {new.req_id: new.num_computed_tokens for new in output.scheduled_new_reqs}
        cached = output.scheduled_cached_reqs
        starts.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        assert output.kv_connector_metadata is not None
        # As vLLM's model runner does before it zeroes and reuses freed blocks.
        self.worker.handle_preemptions(output.kv_connector_metadata)
        with (
            worker_agent(self.worker),
            set_forward_context(None, self.scheduler.vllm_config),
            KVConnectorModelRunnerMixin.maybe_get_kv_connector_output(output) as kv_output,
        ):
            for layer_name in self.layers:  # as each attention layer does on entry
                self.worker.wait_for_layer_load(layer_name)
            for req_id, start in starts.items():
                self.compute(req_id, start, start + output.num_scheduled_tokens[req_id])
        assert kv_output is not None
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

    def update(self, output: SchedulerOutput, runner_output: ModelRunnerOutput) -> None:
        for outputs in self.scheduler.update_from_output(output, runner_output).values():
            for out in outputs.outputs:
                if out.finish_reason is not None:
                    self.finished[out.request_id] = out.finish_reason

    def step(self) -> SchedulerOutput:
        output = self.schedule()
        self.update(output, self.execute(output))
        return output

    def run(self, timeout_s: float = 60.0) -> None:
        """Step until every request is finished and its blocks are freed. Steps with nothing
        to run are stepped too, as vLLM's engine loop does while the connector stages."""
        deadline = time.monotonic() + timeout_s
        while self.scheduler.has_requests():
            assert time.monotonic() < deadline, f"requests unfinished after {timeout_s} s"
            self.step()

    def slots(self, req_id: str, start: int, end: int) -> torch.Tensor:
        blocks = torch.tensor(self.blocks[req_id], dtype=torch.long)
        positions = torch.arange(start, end)
        return blocks[positions // BLOCK] * BLOCK + positions % BLOCK

    def tokens(self, req_id: str) -> list[int]:
        request = self.scheduler.requests.get(req_id)
        return list(request.all_token_ids) if request else self.prompts[req_id]

    def compute(self, req_id: str, start: int, end: int) -> None:
        """The forward pass over tokens ``[start, end)`` of a request."""
        self.io.compute(
            list(self.layers.values()), self.tokens(req_id)[:end], self.slots(req_id, 0, end), start
        )

    def check(self, req_id: str, start: int, end: int) -> None:
        """Every token in ``[start, end)`` holds exactly the KV of a forward pass over the
        whole sequence."""
        wrong = self.io.wrong(
            list(self.layers.values()), self.tokens(req_id)[:end], self.slots(req_id, 0, end)
        )
        assert wrong is None, f"{req_id}: {wrong}"

    def check_stored(self, tokens: list[int], context: KVContext = PLAIN) -> int:
        """Every chunk of ``tokens`` the engine holds in CPU is the true KV of its prefix;
        returns how many it holds (in a row from the first)."""
        truth = oracle(tokens)
        engine = self.engine
        held = 0
        for chunk in engine.chunks(tokens, context):
            buffer = engine.storage.cpu.get(chunk.key)
            if buffer is None:
                break
            kv = buffer.kv()  # [layers, kv, n, heads, head]
            for layer in range(LAYERS):
                got = kv[layer].movedim(1, 0).reshape(chunk.num_tokens, -1)
                if self.layout is PagedLayout.MLA:
                    got = kv[layer, 0, :, 0]
                want = kv_of(truth[layer, chunk.start : chunk.end], got.view(got.shape[0], -1))
                assert torch.equal(got.reshape(want.shape), want), (chunk.start, layer)
            held += 1
        return held

    def engine_kv(self, tokens: list[int]) -> torch.Tensor:
        """The true KV of ``tokens`` in the engine's ``[layers, kv, n, heads, head]`` layout."""
        truth = oracle(tokens)
        spec = self.engine.spec
        like = torch.empty(len(tokens), *spec.shape(1)[1:], dtype=spec.dtype).squeeze(2)
        return torch.stack([kv_of(truth[layer], like).movedim(0, 1) for layer in range(LAYERS)])

    def no_leaks(self) -> None:
        """Nothing pinned, nothing in flight: every pool slot is free or cached alone."""
        connector = self.connector
        connector.poll()
        assert self.engine.flush(timeout=30), "write-backs to lower tiers still queued"
        storage = self.engine.storage
        assert len(connector.pins) == 0, "pins left behind"
        assert not connector._stores and not connector._loads, "transfers left in flight"
        assert storage.pool.free_slots + len(storage.cpu) == storage.pool.num_slots, "slots"
        assert len(storage.cpu.keys_lru_first()) == len(storage.cpu), "held cache entries"

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


def make_kv_cache_config(num_blocks: int) -> KVCacheConfig:
    return KVCacheConfig(
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


def make_scheduler(vllm_config: VllmConfig, num_blocks: int) -> Scheduler:
    async_scheduling = vllm_config.scheduler_config.async_scheduling
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    return (AsyncScheduler if async_scheduling else Scheduler)(
        vllm_config=vllm_config,
        kv_cache_config=make_kv_cache_config(num_blocks),
        log_stats=True,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK,
    )


def make_rig(
    vllm_config: VllmConfig,
    layout: PagedLayout = PagedLayout.BLOCK_FIRST,
    num_blocks: int = 256,
    device: str = "cpu",
) -> Rig:
    kv_cache_config = make_kv_cache_config(num_blocks)
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    worker = KVConnectorFactory.create_connector(
        vllm_config, KVConnectorRole.WORKER, kv_cache_config
    )
    names = kv_cache_config.kv_cache_groups[0].layer_names
    layers = {name: make_paged(layout, num_blocks, device) for name in names}
    worker.register_kv_caches(layers)
    return Rig(make_scheduler(vllm_config, num_blocks), worker, layers, layout)


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
