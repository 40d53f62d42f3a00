"""Names, labels, owner references, Services and hashing shared by every rendered child."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmcache_operator import api

Manifest = dict[str, Any]

# app.kubernetes.io/component values; also the selector of each workload.
VLLM = "vllm"
VALKEY = "valkey"


@dataclass(frozen=True)
class Owner:
    """The `LMCacheDeployment` a set of children belongs to."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])

    def child(self, suffix: str = "") -> str:
        return f"{self.name}-{suffix}" if suffix else self.name


def selector(owner: Owner, component: str) -> dict[str, str]:
    """Immutable selector labels: instance and component only, never anything a user sets."""
    return {api.LABEL_INSTANCE: owner.name, api.LABEL_COMPONENT: component}


def labels(owner: Owner, component: str) -> dict[str, str]:
    return {
        api.LABEL_NAME: component,
        **selector(owner, component),
        api.LABEL_PART_OF: api.PART_OF,
        api.LABEL_MANAGED_BY: api.MANAGED_BY,
    }


def metadata(owner: Owner, name: str, component: str) -> dict[str, Any]:
    """Metadata with a controller owner reference, so deleting the CR lets GC clean up."""
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, component),
        "ownerReferences": [
            {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def port_service(
    owner: Owner, name: str, component: str, port_name: str, port: int, headless: bool
) -> Manifest:
    """A Service of one named TCP port onto the component's pods; headless: its DNS name
    resolves to every ready pod."""
    spec: dict[str, Any] = {
        "selector": selector(owner, component),
        "ports": [{"name": port_name, "port": port, "targetPort": port_name, "protocol": "TCP"}],
    }
    if headless:
        spec["clusterIP"] = "None"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, name, component),
        "spec": spec,
    }


def pod_security(uid: int) -> dict[str, Any]:
    """Pod Security Standards "restricted" for a pod: non-root as ``uid``, its volumes owned
    by that group, the runtime's default seccomp profile."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security(read_only_root: bool = False) -> dict[str, Any]:
    """Pod Security Standards "restricted" for a container: no privilege escalation, no
    capabilities."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    } | ({"readOnlyRootFilesystem": True} if read_only_root else {})


def stable_hash(value: Any) -> str:
    """A short digest of a JSON-able value, independent of dict ordering."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
