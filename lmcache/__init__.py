"""lmcache-kube's embedded KV-cache engine, a drop-in for the ``lmcache`` package.

vLLM's built-in ``LMCacheConnectorV1`` imports ``lmcache.integration.vllm.vllm_v1_adapter``.
"""

from lmcache.config import ConfigError, LMCacheEngineConfig
from lmcache.engine import LMCacheEngine, PrefetchHandle
from lmcache.spec import KVSpec

__all__ = ["ConfigError", "KVSpec", "LMCacheEngine", "LMCacheEngineConfig", "PrefetchHandle"]
__version__ = "0.1.0"
