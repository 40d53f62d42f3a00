"""Engine settings derived from vLLM's config: file/env as usual, ``lmcache.<key>`` in
``kv_connector_extra_config`` on top, plus the shard this process holds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmcache.config import LMCacheEngineConfig

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig, VllmConfig

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


def model_name(vllm_config: VllmConfig) -> str:
    return str(vllm_config.model_config.model)
