"""Custom resources every CEL rule of the CRD refuses: each with the message the rule gives and
the field the API server names. The unit tests evaluate the rules with cel-python
(``tests/operator/test_crd.py``); the end-to-end tests send them to a real API server
(``e2e/test_operator.py``)."""

from __future__ import annotations

from typing import Any

INVALID: dict[str, tuple[dict[str, Any], str, str]] = {
    "valkey with remote": (
        {"valkey": {"enabled": True}, "remote": {"url": "valkey://x:6379"}},
        "valkey.enabled and remote.url are exclusive",
        "spec.remote.url",
    ),
    "hugepages with shm_name": (
        {"lmcache": {"hugepages": {"enabled": True}, "extraConfig": {"shm_name": "x"}}},
        "incompatible with extraConfig.shm_name",
        "spec.lmcache.extraConfig",
    ),
    "hugepages with p2p": (
        {"lmcache": {"hugepages": {"enabled": True}, "extraConfig": {"enable_p2p": True}}},
        "incompatible with extraConfig.enable_p2p",
        "spec.lmcache.extraConfig",
    ),
    "disk without size": (
        {"lmcache": {"localDisk": {"enabled": True}}},
        "localDisk.size must be > 0",
        "spec.lmcache.localDisk.size",
    ),
    "disk with zero size": (
        {"lmcache": {"localDisk": {"enabled": True, "size": 0}}},
        "localDisk.size must be > 0",
        "spec.lmcache.localDisk.size",
    ),
    "credentials without url": (
        {"remote": {"credentialsSecretRef": {"name": "s"}}},
        "remote.credentialsSecretRef needs remote.url",
        "spec.remote.credentialsSecretRef",
    ),
    "metrics on the vllm port": (
        {"metrics": {"port": 8000}},
        "metrics.port must differ from service.port",
        "spec.metrics.port",
    ),
    "kv events on the vllm port": (
        {"kvEvents": {"enabled": True, "port": 8000}},
        "kvEvents.port must differ from service.port and metrics.port",
        "spec.kvEvents.port",
    ),
    "kv events on the metrics port": (
        {"kvEvents": {"enabled": True, "port": 9090}},
        "kvEvents.port must differ from service.port and metrics.port",
        "spec.kvEvents.port",
    ),
    "model cache claim and class": (
        {"modelCache": {"claimName": "c", "storageClassName": "s"}},
        "modelCache.claimName and modelCache.storageClassName are exclusive",
        "spec.modelCache.claimName",
    ),
    "recreate with rolling parameters": (
        {"strategy": {"type": "Recreate", "rollingUpdate": {"maxSurge": 1}}},
        "strategy.rollingUpdate is only for type RollingUpdate",
        "spec.strategy.rollingUpdate",
    ),
    "an engine key the operator sets": (
        {"lmcache": {"extraConfig": {"chunk_size": 128}}},
        "keys the operator sets from typed fields; set these instead: chunk_size (lmcache.chunk",
        "spec.lmcache.extraConfig",
    ),
    "rollout that can never replace a pod": (
        {"strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}}},
        "maxSurge and maxUnavailable cannot both be 0",
        "spec.strategy.rollingUpdate.maxUnavailable",
    ),
}
"""name -> (spec, message, field)"""
