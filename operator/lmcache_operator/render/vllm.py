"""The vLLM Deployment and its Service."""

from __future__ import annotations

import json
from typing import Any

from lmcache_operator import api, quantity
from lmcache_operator.render import sizing
from lmcache_operator.render.common import (
    VLLM,
    Manifest,
    Owner,
    container_security,
    labels,
    metadata,
    pod_security,
    port_service,
    selector,
)
from lmcache_operator.render.engine_config import CONFIG_KEY, configmap_name
from lmcache_operator.render.valkey import credentials
from lmcache_operator.spec import Spec

# "recompute": a chunk the engine cannot load (a dead remote, a corrupt file) is recomputed;
# vLLM's default, "fail", would end the request with an error instead.
KV_TRANSFER_CONFIG = json.dumps(
    {
        "kv_connector": "LMCacheConnectorV1",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
    },
    separators=(",", ":"),
)
# The UID/GID of the vllm-lmcache image's `vllm` user (images/vllm-lmcache/Dockerfile).
VLLM_UID = 10001
# Startup probe period; the failure threshold follows vllm.startupTimeoutSeconds.
STARTUP_PERIOD = 10
# Scheduling and pulling a multi-GB image come before the startup probe's budget starts.
ROLLOUT_SLACK_SECONDS = 600


def kv_events_config(spec: Spec) -> str:
    """vLLM's --kv-events-config: each pod binds its own ZMQ publisher on the kvEvents port."""
    return json.dumps(
        {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{spec.kv_events.port}",
            "topic": spec.kv_events.topic,
        },
        separators=(",", ":"),
    )


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
    if spec.kv_events.enabled:
        args.append(f"--kv-events-config={kv_events_config(spec)}")
    return args + list(spec.vllm.extra_args)


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def env(spec: Spec, owner: Owner) -> list[dict[str, Any]]:
    """Secrets only as secretKeyRef env: never in the ConfigMap or the remote URL."""
    out: list[dict[str, Any]] = [
        {"name": "LMCACHE_CONFIG_FILE", "value": api.CONFIG_FILE},
        {"name": "HF_HOME", "value": spec.model_cache.path},
    ]
    if spec.metrics_enabled:
        out.append({"name": "PROMETHEUS_MULTIPROC_DIR", "value": api.METRICS_DIR})
    if creds := credentials(spec, owner):
        if creds.username_key is not None:
            user = _secret_env("LMCACHE_REMOTE_USERNAME", creds.secret, creds.username_key, True)
            out.append(user)
        out.append(_secret_env("LMCACHE_REMOTE_PASSWORD", creds.secret, creds.password_key))
    if spec.hf_token:
        out.append(_secret_env("HF_TOKEN", spec.hf_token.name, spec.hf_token.key))
    return out + [dict(v) for v in spec.vllm.env]


def resources(spec: Spec) -> dict[str, dict[str, str]]:
    """GPUs and hugepages as requests = limits (the kubelet insists for hugepages); memory
    request = limit so the pinned pool is never the reason a node overcommits. Ephemeral
    storage is requested (not limited) for the writable layer and every disk-backed emptyDir,
    so pods land where the model download and the disk tier fit."""
    memory = sizing.container_memory(spec)
    gpus = str(spec.gpus_per_pod)
    requests = {
        "cpu": spec.resources.cpu,
        "memory": memory,
        "ephemeral-storage": quantity.format_binary(sizing.ephemeral_storage_bytes(spec)),
        spec.resources.gpu_resource_name: gpus,
    }
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
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
        _model_cache_volume(spec, owner),
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "lmcache-config", "mountPath": api.CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "model-cache", "mountPath": spec.model_cache.path}
        | ({"readOnly": True} if spec.model_cache.read_only else {}),
    ]
    if spec.metrics_enabled:
        # Fresh for each pod (prometheus-client wants an empty directory at start); small
        # files of counters, in memory.
        volumes.append(
            {"name": "prometheus-multiproc", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}
        )
        mounts.append({"name": "prometheus-multiproc", "mountPath": api.METRICS_DIR})
    if spec.lmcache.hugepages:
        volumes.append({"name": "hugepages", "emptyDir": {"medium": "HugePages-2Mi"}})
        mounts.append({"name": "hugepages", "mountPath": api.HUGEPAGES_DIR})
    disk = spec.lmcache.local_disk
    if disk_bytes := sizing.disk_tier_bytes(spec):
        size = quantity.format_binary(disk_bytes)
        if disk.storage_class:
            volumes.append(_ephemeral_claim("lmcache-disk", owner, disk.storage_class, size))
        else:
            volumes.append({"name": "lmcache-disk", "emptyDir": {"sizeLimit": size}})
        mounts.append({"name": "lmcache-disk", "mountPath": disk.path})
    volumes += [dict(v) for v in spec.volumes]
    mounts += [dict(m) for m in spec.volume_mounts]
    return volumes, mounts


def _ephemeral_claim(name: str, owner: Owner, storage_class: str, size: str) -> dict[str, Any]:
    """A per-pod PVC created and deleted with the pod (a generic ephemeral volume)."""
    return {
        "name": name,
        "ephemeral": {
            "volumeClaimTemplate": {
                "metadata": {"labels": labels(owner, VLLM)},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": storage_class,
                    "resources": {"requests": {"storage": size}},
                },
            }
        },
    }


def _model_cache_volume(spec: Spec, owner: Owner) -> dict[str, Any]:
    cache = spec.model_cache
    if cache.claim_name:
        claim = {"claimName": cache.claim_name, "readOnly": cache.read_only}
        return {"name": "model-cache", "persistentVolumeClaim": claim}
    if cache.storage_class:
        return _ephemeral_claim("model-cache", owner, cache.storage_class, cache.size)
    return {"name": "model-cache", "emptyDir": {"sizeLimit": cache.size}}


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def container_ports(spec: Spec) -> list[dict[str, Any]]:
    """vLLM's HTTP port, the engine's metrics (every TP rank's in one scrape) and, with
    kvEvents, the ZMQ publisher a KV-aware router subscribes to."""
    ports = [{"name": "http", "containerPort": spec.service_port, "protocol": "TCP"}]
    if spec.metrics_enabled:
        ports.append(
            {"name": "lmcache-metrics", "containerPort": spec.metrics_port, "protocol": "TCP"}
        )
    if spec.kv_events.enabled:
        ports.append({"name": "kv-events", "containerPort": spec.kv_events.port, "protocol": "TCP"})
    return ports


def container(spec: Spec, owner: Owner, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "vllm",
        "image": spec.image.ref,
        "imagePullPolicy": spec.image.pull_policy,
        "command": ["vllm", "serve"],
        "args": vllm_args(spec),
        "env": env(spec, owner),
        "ports": container_ports(spec),
        "resources": resources(spec),
        "volumeMounts": mounts,
        "securityContext": container_security(),
        # Model download and load can take many minutes; /health only answers after that.
        "startupProbe": _probe("/health", STARTUP_PERIOD, startup_failures(spec)),
        "readinessProbe": _probe("/health", 10, 3),
        "livenessProbe": _probe("/health", 15, 5),
    }


def startup_failures(spec: Spec) -> int:
    return -(-spec.vllm.startup_timeout_seconds // STARTUP_PERIOD)


def progress_deadline(spec: Spec) -> int:
    """Longer than a pod may take to start, so a large model still downloading is
    Progressing, not Degraded."""
    return startup_failures(spec) * STARTUP_PERIOD + ROLLOUT_SLACK_SECONDS


def pod_spec(spec: Spec, owner: Owner) -> dict[str, Any]:
    volumes, mounts = _volumes(spec, owner)
    place = spec.placement
    pod: dict[str, Any] = {
        "securityContext": pod_security(VLLM_UID),
        # vLLM never calls the Kubernetes API: no token in the pod.
        "automountServiceAccountToken": False,
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
    return {k: v for k, v in pod.items() if v is not None and v != {} and v != []}


def strategy(spec: Spec) -> dict[str, Any]:
    """Default maxSurge 0: GPU clusters rarely have a spare GPU node, so a surge pod would
    hang Pending and stall the rollout; replacing one pod at a time always makes progress."""
    if spec.strategy.type == "Recreate":
        return {"type": "Recreate"}
    rolling = {"maxSurge": spec.strategy.max_surge, "maxUnavailable": spec.strategy.max_unavailable}
    return {"type": "RollingUpdate", "rollingUpdate": rolling}


def deployment(
    spec: Spec, owner: Owner, config_hash: str, secret_hash: str | None = None
) -> Manifest:
    """`secret_hash` follows the Valkey password's Secret, so a new password rolls the pods
    that read it from env at start."""
    pod_labels = {**spec.pod_labels, **labels(owner, VLLM)}
    annotations = {**spec.pod_annotations, api.ANNOTATION_CONFIG_HASH: config_hash}
    if secret_hash:
        annotations[api.ANNOTATION_SECRET_HASH] = secret_hash
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(owner, owner.name, VLLM),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector(owner, VLLM)},
            "strategy": strategy(spec),
            "progressDeadlineSeconds": progress_deadline(spec),
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


def kv_events_service(spec: Spec, owner: Owner) -> Manifest:
    """Headless: its DNS name resolves to every ready pod's IP, and its EndpointSlices list
    them, so a KV-aware router subscribes to each pod's publisher (events are per pod, a
    load-balanced connection would see one pod's only)."""
    return port_service(
        owner, owner.child("kv-events"), VLLM, "kv-events", spec.kv_events.port, headless=True
    )
