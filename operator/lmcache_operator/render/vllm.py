"""The vLLM Deployment and its Service."""

from __future__ import annotations

import json
from typing import Any

from lmcache_operator import api, quantity
from lmcache_operator.render import sizing
from lmcache_operator.render.common import VLLM, Manifest, Owner, labels, metadata, selector
from lmcache_operator.render.engine_config import CONFIG_KEY, configmap_name
from lmcache_operator.render.valkey import auth_secret_ref
from lmcache_operator.spec import Spec

KV_TRANSFER_CONFIG = json.dumps(
    {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}, separators=(",", ":")
)
HUGEPAGES_MOUNT = "/dev/hugepages"


def vllm_args(spec: Spec) -> list[str]:
    """`vllm serve` arguments; the operator owns the flags it renders, extraArgs go last."""
    args = [
        spec.model,
        "--host=0.0.0.0",
        f"--port={spec.service_port}",
        f"--tensor-parallel-size={spec.vllm.tensor_parallel_size}",
        f"--gpu-memory-utilization={spec.vllm.gpu_memory_utilization:g}",
        f"--kv-transfer-config={KV_TRANSFER_CONFIG}",
    ]
    if spec.vllm.max_model_len is not None:
        args.append(f"--max-model-len={spec.vllm.max_model_len}")
    if spec.served_model_name:
        args.append(f"--served-model-name={spec.served_model_name}")
    return args + list(spec.vllm.extra_args)


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def env(spec: Spec, owner: Owner) -> list[dict[str, Any]]:
    """Secrets only as secretKeyRef env: never in the ConfigMap or the remote URL."""
    out: list[dict[str, Any]] = [{"name": "LMCACHE_CONFIG_FILE", "value": api.CONFIG_FILE}]
    valkey_ref = auth_secret_ref(spec, owner)
    if valkey_ref:
        out.append(_secret_env("LMCACHE_REMOTE_PASSWORD", *valkey_ref))
    elif spec.remote.url and spec.remote.credentials_secret:
        secret = spec.remote.credentials_secret
        out.append(_secret_env("LMCACHE_REMOTE_USERNAME", secret, spec.remote.username_key, True))
        out.append(_secret_env("LMCACHE_REMOTE_PASSWORD", secret, spec.remote.password_key))
    if spec.hf_token:
        out.append(_secret_env("HF_TOKEN", spec.hf_token.name, spec.hf_token.key))
    return out + [dict(v) for v in spec.vllm.env]


def resources(spec: Spec) -> dict[str, dict[str, str]]:
    """GPUs and hugepages as requests = limits (the kubelet insists for hugepages); memory
    request = limit so the pinned pool is never the reason a node overcommits."""
    memory = sizing.container_memory(spec)
    gpus = str(spec.gpus_per_pod)
    requests = {"cpu": spec.resources.cpu, "memory": memory, spec.resources.gpu_resource_name: gpus}
    limits = {"memory": memory, spec.resources.gpu_resource_name: gpus}
    hugepages = sizing.hugepages_per_pod(spec)
    if hugepages:
        size = quantity.format_binary(hugepages)
        requests["hugepages-2Mi"] = size
        limits["hugepages-2Mi"] = size
    return {"requests": requests, "limits": limits}


def _volumes(spec: Spec, owner: Owner) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {
            "name": "lmcache-config",
            "projected": {
                "sources": [
                    {
                        "configMap": {
                            "name": configmap_name(owner),
                            "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}],
                        }
                    }
                ]
            },
        },
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "lmcache-config", "mountPath": api.CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if spec.lmcache.hugepages:
        volumes.append({"name": "hugepages", "emptyDir": {"medium": "HugePages-2Mi"}})
        mounts.append({"name": "hugepages", "mountPath": HUGEPAGES_MOUNT})
    disk = spec.lmcache.local_disk
    if disk.enabled and disk.size:
        size = quantity.format_binary(sizing.disk_volume_bytes(disk.size, spec.engine_processes))
        if disk.storage_class:
            volumes.append(
                {
                    "name": "lmcache-disk",
                    "ephemeral": {
                        "volumeClaimTemplate": {
                            "metadata": {"labels": labels(owner, VLLM)},
                            "spec": {
                                "accessModes": ["ReadWriteOnce"],
                                "storageClassName": disk.storage_class,
                                "resources": {"requests": {"storage": size}},
                            },
                        }
                    },
                }
            )
        else:
            volumes.append({"name": "lmcache-disk", "emptyDir": {"sizeLimit": size}})
        mounts.append({"name": "lmcache-disk", "mountPath": disk.path})
    return volumes, mounts


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def container(spec: Spec, owner: Owner, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    ports = [{"name": "http", "containerPort": spec.service_port, "protocol": "TCP"}]
    if spec.metrics_enabled:
        ports.append(
            {"name": "lmcache-metrics", "containerPort": spec.metrics_port, "protocol": "TCP"}
        )
    return {
        "name": "vllm",
        "image": spec.image.ref,
        "imagePullPolicy": spec.image.pull_policy,
        "command": ["vllm", "serve"],
        "args": vllm_args(spec),
        "env": env(spec, owner),
        "ports": ports,
        "resources": resources(spec),
        "volumeMounts": mounts,
        # Model download and load can take many minutes; /health only answers after that.
        "startupProbe": _probe("/health", 10, 180),
        "readinessProbe": _probe("/health", 10, 3),
        "livenessProbe": _probe("/health", 15, 5),
    }


def pod_spec(spec: Spec, owner: Owner) -> dict[str, Any]:
    volumes, mounts = _volumes(spec, owner)
    place = spec.placement
    pod: dict[str, Any] = {
        "containers": [container(spec, owner, mounts)],
        "volumes": volumes,
        "imagePullSecrets": [{"name": n} for n in spec.image.pull_secrets],
        "nodeSelector": dict(place.node_selector),
        "tolerations": [dict(t) for t in place.tolerations],
        "affinity": dict(place.affinity),
        "priorityClassName": place.priority_class_name,
        "runtimeClassName": place.runtime_class_name,
        "serviceAccountName": spec.service_account_name,
    }
    return {k: v for k, v in pod.items() if v}


def deployment(spec: Spec, owner: Owner, config_hash: str) -> Manifest:
    """maxSurge 0: GPU clusters rarely have a spare GPU node, so a surge pod would hang
    Pending and stall the rollout; replacing one pod at a time always makes progress."""
    pod_labels = {**spec.pod_labels, **labels(owner, VLLM)}
    annotations = {**spec.pod_annotations, api.ANNOTATION_CONFIG_HASH: config_hash}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(owner, owner.name, VLLM),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector(owner, VLLM)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
            },
            "template": {
                "metadata": {"labels": pod_labels, "annotations": annotations},
                "spec": pod_spec(spec, owner),
            },
        },
    }


def service(spec: Spec, owner: Owner) -> Manifest:
    ports = [{"name": "http", "port": spec.service_port, "targetPort": "http", "protocol": "TCP"}]
    if spec.metrics_enabled:
        ports.append(
            {
                "name": "lmcache-metrics",
                "port": spec.metrics_port,
                "targetPort": "lmcache-metrics",
                "protocol": "TCP",
            }
        )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, owner.name, VLLM),
        "spec": {
            "type": spec.service_type,
            "selector": selector(owner, VLLM),
            "ports": ports,
        },
    }
