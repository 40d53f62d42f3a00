"""The LMCache config file (`config.yaml`) derived from the spec, and its ConfigMap."""

from __future__ import annotations

from typing import Any

import yaml

from lmcache_operator.render.common import VLLM, Manifest, Owner, metadata, stable_hash
from lmcache_operator.spec import Spec

CONFIG_KEY = "config.yaml"
VALKEY_PORT = 6379


def valkey_host(owner: Owner) -> str:
    return f"{owner.child('valkey')}.{owner.namespace}.svc"


def remote_url(spec: Spec, owner: Owner) -> str | None:
    """The in-cluster Valkey when enabled, else the external URL (never with credentials)."""
    if spec.valkey.enabled:
        return f"valkey://{valkey_host(owner)}:{VALKEY_PORT}"
    return spec.remote.url


def engine_config(spec: Spec, owner: Owner) -> dict[str, Any]:
    """Engine keys from typed fields, then extraConfig (validated not to collide)."""
    lmc = spec.lmcache
    config: dict[str, Any] = {
        "chunk_size": lmc.chunk_size,
        "local_cpu": lmc.local_cpu,
        "max_local_cpu_size": lmc.max_local_cpu_size,
        "local_cpu_use_hugepages": lmc.hugepages,
        "prefetch": lmc.prefetch,
    }
    if lmc.local_disk.enabled:
        config["local_disk"] = lmc.local_disk.path
        config["max_local_disk_size"] = lmc.local_disk.size
    url = remote_url(spec, owner)
    if url:
        config["remote_url"] = url
        config["remote_serde"] = "naive"
    if spec.metrics_enabled:
        config["metrics_port"] = spec.metrics_port
    config.update(lmc.extra_config)
    return config


def config_yaml(config: dict[str, Any]) -> str:
    """Sorted keys, so the same config is the same bytes and the same hash."""
    return yaml.safe_dump(config, sort_keys=True, default_flow_style=False)


def config_hash(text: str) -> str:
    return stable_hash(text)


def configmap_name(owner: Owner) -> str:
    return owner.child("lmcache-config")


def configmap(owner: Owner, text: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, configmap_name(owner), VLLM),
        "data": {CONFIG_KEY: text},
    }
