"""Test helpers: the CRD file, example manifests, and an in-memory cluster.

`FakeCluster` stands in for the API server in reconciler tests, because no API server runs
in the unit suite (the e2e suite runs the same reconciler against a real one). It behaves
like one where the reconciler could be fooled: applies add server-side defaults and bump
resourceVersion/generation, hand edits are plain mutations, and every write is recorded.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from lmcache_operator import api
from lmcache_operator.capacity import Node
from lmcache_operator.kube import ApiError, Body, key_of

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "charts/lmcache-operator/crds/lmcachedeployments.serving.lmcache-kube.io.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("lmcachedeployment-*.yaml"))


def load_crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def crd_schema() -> dict[str, Any]:
    return load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: a missing field with a default gets
    it, and a defaulted object is defaulted recursively."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, sub in schema["properties"].items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(sub, out[name])
        return out
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], v) for v in value]
    return value


def custom_resource(
    spec: Mapping[str, Any], name: str = "demo", namespace: str = "ml", generation: int = 1
) -> Body:
    """A CR as the API server would hand it out: defaulted, with uid and generation."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "generation": generation,
            "resourceVersion": "1",
        },
        "spec": apply_defaults(crd_schema()["properties"]["spec"], dict(spec)),
    }


def node(
    name: str,
    gpus: int = 8,
    hugepages: str = "0",
    labels: dict[str, str] | None = None,
    unschedulable: bool = False,
    taints: list[dict[str, str]] | None = None,
    memory: str = "512Gi",
    disk: str = "1Ti",
) -> Body:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"unschedulable": unschedulable, "taints": taints or []},
        "status": {
            "allocatable": {
                "nvidia.com/gpu": str(gpus),
                "hugepages-2Mi": hugepages,
                "memory": memory,
                "cpu": "64",
                "ephemeral-storage": disk,
                "pods": "110",
            }
        },
    }


# Defaults a real API server adds to what we apply; the no-churn check must ignore them.
_SERVER_DEFAULTS = {
    "Deployment": {
        "spec": {
            "revisionHistoryLimit": 10,
            "progressDeadlineSeconds": 600,
            "template": {
                "spec": {
                    "restartPolicy": "Always",
                    "dnsPolicy": "ClusterFirst",
                    "schedulerName": "default-scheduler",
                }
            },
        }
    },
    "Service": {"spec": {"clusterIPs": ["10.0.0.10"], "sessionAffinity": "None"}},
    "StatefulSet": {"spec": {"podManagementPolicy": "OrderedReady"}},
}


def _merge_defaults(obj: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    for k, v in defaults.items():
        if isinstance(v, Mapping):
            _merge_defaults(obj.setdefault(k, {}), v)
        else:
            obj.setdefault(k, copy.deepcopy(v))


class FakeCluster:
    """In-memory `Cluster` (see the module docstring for why, and what it imitates)."""

    def __init__(self, nodes: list[Body] | None = None) -> None:
        self.objects: dict[tuple[str, str, str, str], Body] = {}
        self.writes: list[tuple[str, str, str]] = []
        self.reads: list[tuple[str, str, str]] = []
        self.events: list[tuple[str, str, str]] = []
        self.node_list = nodes
        self.fail_apply: dict[str, list[ApiError]] = {}  # by kind, raised once each
        self._rv = itertools.count(100)

    # Cluster protocol
    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Body | None:
        found = self.objects.get((api_version, kind, namespace, name))
        return copy.deepcopy(found) if found else None

    def owned(self, uid: str) -> list[Body]:
        return [
            copy.deepcopy(b)
            for b in self.objects.values()
            if any(r.get("uid") == uid for r in b["metadata"].get("ownerReferences") or [])
        ]

    def apply(self, manifest: Body) -> Body:
        if self.fail_apply.get(manifest["kind"]):
            raise self.fail_apply[manifest["kind"]].pop(0)
        key = key_of(manifest)
        old = self.objects.get(key)
        new = copy.deepcopy(manifest)
        _merge_defaults(new, _SERVER_DEFAULTS.get(manifest["kind"], {}))
        meta = new["metadata"]
        meta["resourceVersion"] = str(next(self._rv))
        meta["generation"] = (old or {}).get("metadata", {}).get("generation", 0) + 1
        if old and "status" in old:
            new["status"] = old["status"]
        self.objects[key] = new
        self.writes.append(("apply", manifest["kind"], meta["name"]))
        return copy.deepcopy(new)

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.objects.pop((api_version, kind, namespace, name), None)
        self.writes.append(("delete", kind, name))

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        body = self.objects[(api.API_VERSION, api.KIND, namespace, name)]
        merged = dict(body.get("status") or {})
        for k, v in status.items():
            if v is None:
                merged.pop(k, None)
            else:
                merged[k] = copy.deepcopy(v)
        body["status"] = merged
        self.writes.append(("status", api.KIND, name))

    def event(self, owner: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    def nodes(self) -> list[Node] | None:
        return [Node.of(n) for n in self.node_list] if self.node_list is not None else None

    def secret_metadata(self, namespace: str, name: str) -> Body | None:
        found = self.objects.get(("v1", "Secret", namespace, name))
        if found is None:
            return None
        self.reads.append(("metadata", "Secret", name))
        return {"metadata": copy.deepcopy(found["metadata"])}

    def create(self, manifest: Body) -> Body | None:
        key = key_of(manifest)
        if key in self.objects:
            return None
        new = copy.deepcopy(manifest)
        new["metadata"].update(resourceVersion=str(next(self._rv)), uid=f"uid-{next(self._rv)}")
        self.objects[key] = new
        self.writes.append(("create", manifest["kind"], manifest["metadata"]["name"]))
        return copy.deepcopy(new)

    # helpers for tests
    def add(self, body: Body) -> Body:
        self.objects[key_of(body)] = copy.deepcopy(body)
        return body

    def find(self, kind: str, name: str, namespace: str = "ml") -> Body:
        for (_, k, ns, n), body in self.objects.items():
            if (k, ns, n) == (kind, namespace, name):
                return body
        raise KeyError(f"{kind}/{name}")

    def kinds(self) -> list[tuple[str, str]]:
        return sorted((k[1], k[3]) for k in self.objects if k[1] != api.KIND)

    def set_status(self, kind: str, name: str, status: Mapping[str, Any]) -> None:
        """What the Deployment/StatefulSet controllers would write."""
        self.find(kind, name)["status"] = dict(status)
