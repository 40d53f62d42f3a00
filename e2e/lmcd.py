"""The `LMCacheDeployment` API as a user sees it: manifests, waits, and what the operator owns.

Expectations are computed here from the public contract (the CRD and docs), never imported from
the operator, so a wrong formula in the operator cannot also be the test's expectation.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

import yaml

from e2e.kube import Kube, Obj, condition, wait_for

API_VERSION = "serving.lmcache-kube.io/v1alpha1"
KIND = "LMCacheDeployment"
CRD_NAME = "lmcachedeployments.serving.lmcache-kube.io"
CONFIG_HASH = "serving.lmcache-kube.io/config-hash"
HUGEPAGE = 2 << 20
GIB = 1 << 30
# The state of each condition when all is well.
HEALTHY = {
    "Ready": "True",
    "Progressing": "False",
    "Degraded": "False",
    "ConfigValid": "True",
    "ValkeyReady": "True",
    "Schedulable": "True",
    "Reconciling": "False",
    "Stalled": "False",
}

_SUFFIX = {
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "": 1,
}


def quantity_bytes(q: str | int) -> int:
    """A Kubernetes quantity of bytes (`16Gi`, `616Mi`, `1024`) as an int."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[kMGT]|)", str(q))
    assert m, f"not a byte quantity: {q!r}"
    return int(Fraction(m.group(1)) * _SUFFIX[m.group(2)])


def hugepage_bytes(max_local_cpu_size_gb: float, tensor_parallel: int) -> int:
    """What a pod must request: one pool per TP rank, each rounded up to whole 2 MiB pages."""
    pages = math.ceil(Fraction(str(max_local_cpu_size_gb)) * GIB / HUGEPAGE)
    return pages * HUGEPAGE * tensor_parallel


def manifest(name: str, **spec: Any) -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {"model": "Qwen/Qwen2.5-0.5B-Instruct", **spec},
    }


def get(k8s: Kube, name: str, namespace: str) -> Obj | None:
    return k8s.get(API_VERSION, KIND, name, namespace)


def bad_conditions(cr: Obj | None) -> dict[str, str]:
    """Conditions not in their healthy state, as type -> 'status: message'."""
    out = {}
    for type_, good in HEALTHY.items():
        c = condition(cr, type_)
        if c is None or c["status"] != good:
            out[type_] = f"{(c or {}).get('status')}: {(c or {}).get('message')}"
    return out


def settled(cr: Obj | None) -> bool:
    """Ready, every condition healthy, and the status is about the current generation."""
    if not cr:
        return False
    status = cr.get("status") or {}
    replicas = cr["spec"].get("replicas", 1)
    return (
        status.get("observedGeneration") == cr["metadata"]["generation"]
        and status.get("phase") == "Ready"
        and (status.get("readyReplicas") or 0) == replicas
        and not bad_conditions(cr)
    )


def wait_ready(k8s: Kube, name: str, namespace: str, timeout: float = 90.0) -> Obj:
    def probe() -> Obj | None:
        cr = get(k8s, name, namespace)
        return cr if settled(cr) else None

    try:
        return wait_for(f"LMCacheDeployment {namespace}/{name} Ready", probe, timeout)
    except AssertionError as e:
        cr = get(k8s, name, namespace) or {}
        raise AssertionError(f"{e}\nstatus: {cr.get('status')}") from None


def wait_observed(k8s: Kube, name: str, namespace: str, timeout: float = 60.0) -> Obj:
    """The operator has written status for the current generation (whatever it says)."""

    def probe() -> Obj | None:
        cr = get(k8s, name, namespace)
        gen = (cr or {}).get("metadata", {}).get("generation")
        observed = ((cr or {}).get("status") or {}).get("observedGeneration")
        return cr if cr and observed == gen else None

    return wait_for(f"status.observedGeneration of {namespace}/{name}", probe, timeout)


def engine_config(k8s: Kube, name: str, namespace: str) -> dict[str, Any]:
    """The LMCache config the pods mount, parsed from the ConfigMap the operator projects."""
    cm = k8s.get("v1", "ConfigMap", f"{name}-lmcache-config", namespace)
    assert cm, f"ConfigMap {name}-lmcache-config missing"
    return dict(yaml.safe_load(cm["data"]["config.yaml"]))


def owned_by(obj: Obj, cr: Obj) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(r["uid"] == cr["metadata"]["uid"] and r.get("controller") for r in refs)
