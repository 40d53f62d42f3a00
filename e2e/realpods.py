"""What the real-node tests and `make demo-k8s` share: placing a namespace's pods on the real
node, the chart and LMCacheDeployment fields that select the images built here, and talking to
the engine pods' (stand-in) OpenAI endpoint.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

from e2e import node
from e2e.kube import Obj

# The engine image's stand-in model (e2e/standin/tiny-llama: config.json only, no weights).
MODEL = "/opt/vllm-standin/tiny-llama"
BLOCK = 16  # the stand-in's KV block size (vLLM's default)
CORE_PID = re.compile(r"engine core ready \(pid (\d+)\)")


def namespace(name: str) -> Obj:
    """A namespace whose every pod (the operator's Valkey included, which has no placement
    fields) lands on the real node: the PodNodeSelector and PodTolerationRestriction admission
    plugins add the node selector and the toleration of its taint."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "annotations": {
                "scheduler.alpha.kubernetes.io/node-selector": f"{node.LABEL}=true",
                "scheduler.alpha.kubernetes.io/defaultTolerations": json.dumps([node.TOLERATION]),
            },
        },
    }


def chart_values(images: dict[str, str]) -> list[str]:
    """`helm install` flags: the operator image built here, on the real node."""
    repository, tag = images["operator"].rsplit(":", 1)
    return [
        f"--set=image.repository={repository}",
        f"--set=image.tag={tag}",
        "--set=image.pullPolicy=Never",
        f"--set-json=nodeSelector={json.dumps({node.LABEL: 'true'})}",
        f"--set-json=tolerations={json.dumps([node.TOLERATION])}",
    ]


def engine_spec(images: dict[str, str], **spec: Any) -> dict[str, Any]:
    """An LMCacheDeployment spec that runs the engine image built here (never pulled), sized
    for a 2-core node: the model is the stand-in's, the pool and Valkey a few MiB."""
    repository, tag = images["engine"].rsplit(":", 1)
    base: dict[str, Any] = {
        "model": MODEL,
        # As a user with tainted GPU nodes would: the operator's Schedulable condition reads these.
        "nodeSelector": {node.LABEL: "true"},
        "tolerations": [node.TOLERATION],
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "resources": {"gpus": 1, "cpu": "100m", "memory": "3Gi"},
        "lmcache": {"chunkSize": 256, "maxLocalCpuSize": 0.0625},
    }
    for key, value in spec.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    return base


def valkey_spec(images: dict[str, str], max_memory: str = "32Mi") -> dict[str, Any]:
    return {
        "enabled": True,
        "image": images["valkey"],
        "maxMemory": max_memory,
        "resources": {"cpu": "100m"},
        "auth": {"enabled": True},
    }


def complete(pod_ip: str, prompt: list[int], port: int = 8000, timeout: float = 120) -> Obj:
    """POST /v1/completions with token ids to one engine pod (the host routes to pod IPs)."""
    body = json.dumps({"prompt": prompt, "max_tokens": 1}).encode()
    request = urllib.request.Request(
        f"http://{pod_ip}:{port}/v1/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return dict(json.load(resp))
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{pod_ip}: HTTP {e.code}: {e.read().decode(errors='replace')}") from e


def cached_tokens(response: Obj) -> int:
    return int(response["usage"]["prompt_tokens_details"]["cached_tokens"])


def lmcache_lines(log: str) -> list[str]:
    """The engine's per-request lines (lookup and store), as `kubectl logs` shows them."""
    return [
        line
        for line in log.splitlines()
        if "LMCache hit tokens" in line or "Storing KV cache for" in line
    ]
