"""Engine settings derived from vLLM's config: file/env as usual, ``lmcache.<key>`` in
``kv_connector_extra_config`` on top, plus the shard this process holds."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcache.config import ConfigError, LMCacheEngineConfig
from lmcache.keys import KVContext
from lmcache.spec import KVSpec

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.v1.request import Request

logger = logging.getLogger("lmcache")

EXTRA_PREFIX = "lmcache."
EXTRA_SOURCE = "kv_connector_extra_config"


def _transfer_config(vllm_config: VllmConfig) -> KVTransferConfig:
    config = vllm_config.kv_transfer_config
    if config is None:
        raise ValueError("the LMCache connector needs vLLM's --kv-transfer-config")
    return config


def engine_config(vllm_config: VllmConfig) -> LMCacheEngineConfig:
    """Defaults < ``LMCACHE_CONFIG_FILE`` < ``LMCACHE_*`` env < ``lmcache.<key>`` extras."""
    extra = _transfer_config(vllm_config).kv_connector_extra_config or {}
    overrides: dict[str, Any] = {
        key[len(EXTRA_PREFIX) :]: value
        for key, value in extra.items()
        if key.startswith(EXTRA_PREFIX)
    }
    return LMCacheEngineConfig.load(overrides=overrides, overrides_source=EXTRA_SOURCE)


def instance_id(vllm_config: VllmConfig) -> str:
    """Names this vLLM instance: the same in its scheduler and all its workers."""
    return str(_transfer_config(vllm_config).engine_id)


def directions(vllm_config: VllmConfig) -> tuple[bool, bool]:
    """(loads, stores) allowed by ``kv_role``: a producer only stores, a consumer only loads."""
    config = _transfer_config(vllm_config)
    return config.is_kv_consumer, config.is_kv_producer


def use_layerwise(vllm_config: VllmConfig) -> bool:
    """vLLM's LMCache wrapper reads the same key to force piecewise CUDA graphs, which
    per-layer waits need."""
    return bool(_transfer_config(vllm_config).get_from_extra_config("use_layerwise", False))


def scheduler_in_worker_process(vllm_config: VllmConfig) -> bool:
    """True when vLLM's scheduler runs in the process of worker rank 0 (uniprocess)."""
    parallel = vllm_config.parallel_config
    return parallel.world_size == 1 and parallel.distributed_executor_backend in (None, "uni")


def shard(vllm_config: VllmConfig) -> tuple[int, int]:
    """(rank, world size) of this worker's KV shard over tensor and pipeline parallelism."""
    parallel = vllm_config.parallel_config
    world_size = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
    if world_size == 1:
        return 0, 1
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group

    tp = get_tp_group()
    return get_pp_group().rank_in_group * tp.world_size + tp.rank_in_group, world_size


def kv_events(vllm_config: VllmConfig) -> bool:
    """Whether vLLM publishes KV events (``--kv-events-config``): then so do our tiers.

    Our events name vLLM's own blocks, so a chunk must be whole blocks."""
    events = vllm_config.kv_events_config
    enabled = bool(events is not None and events.enable_kv_cache_events)
    chunk = engine_config(vllm_config).chunk_size
    block = vllm_config.cache_config.block_size
    if enabled and chunk % block:
        raise ConfigError(
            f"chunk_size: {chunk} is not a multiple of vLLM's block size {block}; allowed with "
            f"--kv-events-config: a multiple of {block}, so that every chunk's KV events name "
            f"whole vLLM blocks"
        )
    return enabled


def world_size(vllm_config: VllmConfig) -> int:
    """KV shards of one instance: every TP rank of every pipeline stage."""
    parallel = vllm_config.parallel_config
    return parallel.tensor_parallel_size * parallel.pipeline_parallel_size


def model_identity(vllm_config: VllmConfig) -> str:
    """What must match for KV to be reusable besides the shard: the model and its weights.

    vLLM's own model-config hash covers architecture, dtype, quantization, revision and the
    rest of what shapes the forward pass; the Hugging Face snapshot actually loaded covers
    an unpinned revision that moved, and a local directory's weight files are fingerprinted
    (a rolling update must not load the old weights' KV into the new model, from disk or
    Valkey); dummy weights differ by seed.
    """
    model = vllm_config.model_config
    identity = f"{model.model}@{model.revision or ''}#{model.compute_hash()[:16]}"
    if str(vllm_config.load_config.load_format) == "dummy":
        return identity + f"+seed{model.seed}"
    weights = _snapshot(str(model.model), model.revision) or local_weights(Path(model.model))
    return identity + f"+{weights}" if weights else identity


def _snapshot(model: str, revision: str | None) -> str | None:
    """The commit of the Hugging Face snapshot of ``model`` in the local cache, if any."""
    if Path(model).exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json", revision=revision)
    except Exception:
        return None
    return Path(found).parent.name if isinstance(found, str) else None


WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf"})
SAMPLES_PER_FILE = 8
SAMPLE_BYTES = 64 << 10


def local_weights(root: Path) -> str | None:
    """A fingerprint of a local model directory's weight files: each one's name, size and 8
    samples of 64 KiB spread over it. A few MiB read at start-up instead of the whole model
    (16 GB for an 8B), and the same on every pod that holds a copy; weights rewritten in
    place (a new fine-tune under the same path) change it. None when ``root`` is not a
    directory of weights."""
    if not root.is_dir():
        return None
    files = sorted(p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    try:
        for path in files:
            size = path.stat().st_size
            digest.update(f"{path.relative_to(root)}\0{size}\0".encode())
            with path.open("rb") as weights:
                for i in range(SAMPLES_PER_FILE):
                    weights.seek(max(0, size - SAMPLE_BYTES) * i // (SAMPLES_PER_FILE - 1))
                    digest.update(weights.read(SAMPLE_BYTES))
    except OSError as err:
        logger.warning("LMCache: weights in %s not fingerprinted (%s); keys omit them", root, err)
        return None
    return digest.hexdigest()[:16]


def kv_dtype(vllm_config: VllmConfig, spec: KVSpec) -> str:
    """The KV cache's element type: vLLM's ``--kv-cache-dtype`` when set (fp8 e4m3 and e5m2
    caches are both uint8 tensors), else the tensor dtype."""
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    return spec.dtype_name if cache_dtype == "auto" else cache_dtype


def bypassed(request: Request) -> bool:
    """Requests whose KV chunk keys cannot name: prompt embeddings stand behind placeholder
    token ids that are the same for every embedding."""
    return request.prompt_token_ids is None or getattr(request, "prompt_embeds", None) is not None


def skips_reading(request: Request) -> bool:
    """vLLM's per-request opt-out of reading cached KV (prompt logprobs need every token
    computed); such requests still store."""
    return bool(getattr(request, "skip_reading_prefix_cache", False))


def context(request: Request) -> KVContext:
    """What besides the token ids keys this request's KV: tenant salt, LoRA adapter, and the
    content hash of each multimodal item at its placeholder."""
    lora = request.lora_request
    items = tuple(
        (int(f.mm_position.offset), str(f.identifier)) for f in (request.mm_features or ())
    )
    return KVContext(
        cache_salt=request.cache_salt,
        lora=f"{lora.lora_name}:{lora.lora_int_id}:{lora.lora_path}" if lora else None,
        multimodal=items,
    )
