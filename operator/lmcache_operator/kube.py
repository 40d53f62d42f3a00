"""The operator's only door to the API server: reads from the watch cache, server-side apply
with one field manager, status merge patches, Events, and retries of transient failures.

The reconciler depends on the `Cluster` protocol, not on this module, so its tests can run
against an in-memory cluster and the e2e tests against a real one, with the same code.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, Protocol, TypeVar

import urllib3
from kubernetes import client as k8s

from lmcache_operator import api, metrics
from lmcache_operator.capacity import Node

log = logging.getLogger(__name__)
T = TypeVar("T")

Body = dict[str, Any]
Key = tuple[str, str, str, str]

# apiVersion/kind → plural, for the kinds the operator touches.
PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Secret"): "secrets",
    ("v1", "Service"): "services",
    ("v1", "Event"): "events",
    ("v1", "Node"): "nodes",
    ("apps/v1", "Deployment"): "deployments",
    ("apps/v1", "StatefulSet"): "statefulsets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("coordination.k8s.io/v1", "Lease"): "leases",
    (api.API_VERSION, api.KIND): api.PLURAL,
}
# Watched and cached. Secrets are not: the operator creates its generated password once and
# reads only metadata, so it needs no list/watch on Secrets (which RBAC cannot narrow by label).
CHILD_KINDS = [
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
]
RETRIED = {409, 429, 500, 502, 503, 504}
PARTIAL_METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


class ApiError(Exception):
    """The API server answered with an error, or (status 0) did not answer in time."""

    def __init__(self, status: int, method: str, path: str, detail: str) -> None:
        what = f"HTTP {status}" if status else "no answer"
        super().__init__(f"{method} {path}: {what}: {detail}")
        self.status = status
        self.detail = detail

    @property
    def namespace_terminating(self) -> bool:
        """The API server refuses new objects in a namespace that is being deleted."""
        return self.status == 403 and "being terminated" in self.detail


def connect_timeout(request_timeout: float) -> float:
    """Connecting takes at most 5 s (or the request's whole budget, if smaller)."""
    return min(5.0, request_timeout)


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    ns = f"/namespaces/{namespace}" if namespace else ""
    tail = f"/{name}" if name else ""
    return f"{prefix}{ns}/{PLURALS[(api_version, kind)]}{tail}"


def key_of(body: Mapping[str, Any]) -> Key:
    meta = body["metadata"]
    return (body["apiVersion"], body["kind"], meta.get("namespace", ""), meta["name"])


class Cluster(Protocol):
    """What the reconciler needs from Kubernetes."""

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Body | None: ...

    def owned(self, uid: str) -> list[Body]: ...

    def apply(self, manifest: Body) -> Body: ...

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None: ...

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None: ...

    def event(self, owner: Mapping[str, Any], type_: str, reason: str, message: str) -> None: ...

    def nodes(self) -> list[Node] | None: ...

    def secret_metadata(self, namespace: str, name: str) -> Body | None: ...

    def create(self, manifest: Body) -> Body | None: ...


class Cache:
    """The latest body of every watched object, fed by kopf's watch streams.

    Reconciles read from it instead of GETting, so a resync of 100 unchanged deployments
    sends nothing to the API server.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[Key, Body] = {}
        self._by_owner: dict[str, set[Key]] = {}  # owner uid -> keys, for pruning

    def put(self, body: Mapping[str, Any]) -> None:
        """Stores a copy without managedFields: often most of an object, and never compared."""
        stored = dict(body)
        stored["metadata"] = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
        key = key_of(stored)
        with self._lock:
            self._unindex(key)
            self._items[key] = stored
            for uid in _owner_uids(stored):
                self._by_owner.setdefault(uid, set()).add(key)

    def drop(self, body: Mapping[str, Any]) -> None:
        key = key_of(body)
        with self._lock:
            self._unindex(key)
            self._items.pop(key, None)

    def _unindex(self, key: Key) -> None:
        old = self._items.get(key)
        for uid in _owner_uids(old) if old else ():
            keys = self._by_owner.get(uid)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_owner[uid]

    def get(self, key: Key) -> Body | None:
        with self._lock:
            return self._items.get(key)

    def owned(self, uid: str) -> list[Body]:
        """Objects with an owner reference to `uid`: an index lookup, not a scan."""
        with self._lock:
            return [self._items[k] for k in self._by_owner.get(uid, ())]

    def keys(self, api_version: str, kind: str) -> list[tuple[str, str]]:
        with self._lock:
            return [(k[2], k[3]) for k in self._items if k[:2] == (api_version, kind)]


def _owner_uids(body: Mapping[str, Any]) -> list[str]:
    return [r["uid"] for r in body["metadata"].get("ownerReferences") or [] if r.get("uid")]


class Nodes:
    """Every Node, parsed once per watch event for the capacity check (see capacity.py)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Node] = {}

    def put(self, body: Mapping[str, Any]) -> None:
        node = Node.of(body)
        with self._lock:
            self._items[node.name] = node

    def drop(self, body: Mapping[str, Any]) -> None:
        with self._lock:
            self._items.pop(body["metadata"]["name"], None)

    def items(self) -> list[Node]:
        with self._lock:
            return list(self._items.values())


def retrying(fn: Callable[[], T], attempts: int = 5, first_delay: float = 0.2) -> T:
    """Retry conflicts, throttling and server errors with exponential backoff."""
    delay = first_delay
    for attempt in range(attempts):
        try:
            return fn()
        except ApiError as e:
            if e.status not in RETRIED or attempt == attempts - 1:
                raise
            log.info("retrying after %s (attempt %d/%d)", e, attempt + 1, attempts)
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


class KubeCluster:
    """`Cluster` over the official client's transport (auth, TLS, proxies from kubeconfig).

    Every request has a deadline: a half-open connection (a frozen API server, a dead load
    balancer) fails the request after `timeout` seconds instead of hanging a worker forever.
    The time of the last answer feeds the liveness probe.
    """

    def __init__(
        self,
        api_client: k8s.ApiClient,
        cache: Cache,
        nodes: Nodes | None = None,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api_client
        self.cache = cache
        self.node_store = nodes  # None: nodes are not watched (--no-read-nodes)
        self.identity = socket.gethostname()
        self.timeout = timeout
        self._clock = clock
        self._last_answer = clock()
        self._answered = True  # the latest request got an answer (even an error)

    def unanswered_for(self) -> float:
        """Seconds since the API server last answered, while the latest request went
        unanswered; 0 when the latest request got an answer (even an error)."""
        return 0.0 if self._answered else self._clock() - self._last_answer

    def request(
        self,
        method: str,
        url_path: str,
        body: Any = None,
        query: Iterable[tuple[str, str]] = (),
        content_type: str = "application/json",
        accept: str = "application/json",
        timeout: float | None = None,
    ) -> Body:
        """One HTTP request; `timeout` (default the cluster's) bounds the connect and each read."""
        limit = timeout or self.timeout
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type  # the client JSON-encodes dicts for all three
        m, url, hdrs, data, _ = self.api.param_serialize(
            method,
            url_path,
            query_params=list(query),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            resp = self.api.call_api(
                m,
                url,
                header_params=hdrs,
                body=data,
                _request_timeout=(connect_timeout(limit), limit),
            )
            resp.read()
        except urllib3.exceptions.HTTPError as e:  # timeouts, refused or reset connections
            metrics.API_REQUESTS.labels(code="none").inc()
            self._answered = False
            raise ApiError(0, method, url_path, f"{type(e).__name__}: {e}") from None
        self._last_answer = self._clock()
        self._answered = True
        metrics.API_REQUESTS.labels(code=str(resp.status)).inc()
        text = (resp.data or b"").decode(errors="replace")
        if not 200 <= resp.status < 300:
            try:
                detail = json.loads(text).get("message", text)
            except ValueError:
                detail = text
            raise ApiError(resp.status, method, url_path, detail[:500])
        return json.loads(text) if text else {}

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Body | None:
        cached = self.cache.get((api_version, kind, namespace, name))
        if cached is not None:
            return cached
        return self._get_or_none(path(api_version, kind, namespace, name))

    def _get_or_none(self, url: str, accept: str = "application/json") -> Body | None:
        """GET (retried), None on 404."""
        try:
            return retrying(lambda: self.request("GET", url, accept=accept))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def owned(self, uid: str) -> list[Body]:
        return self.cache.owned(uid)

    def apply(self, manifest: Body) -> Body:
        """Server-side apply, forcing ownership of our fields back from hand edits."""
        meta = manifest["metadata"]
        url = path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        query = [("fieldManager", api.FIELD_MANAGER), ("force", "true")]
        live = retrying(
            lambda: self.request("PATCH", url, manifest, query, "application/apply-patch+yaml")
        )
        self.cache.put(live)
        return live

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        url = path(api_version, kind, namespace, name)
        query = [("propagationPolicy", "Background")]
        try:
            retrying(lambda: self.request("DELETE", url, query=query))
        except ApiError as e:
            if e.status != 404:
                raise

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        url = path(api.API_VERSION, api.KIND, namespace, name) + "/status"
        live = retrying(
            lambda: self.request(
                "PATCH",
                url,
                {"status": status},
                [("fieldManager", api.FIELD_MANAGER)],
                "application/merge-patch+json",
            )
        )
        self.cache.put(live)

    def event(self, owner: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        meta = owner["metadata"]
        stamp = now_rfc3339()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": api.FIELD_MANAGER},
            "reportingComponent": api.FIELD_MANAGER,
            "reportingInstance": self.identity,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.request("POST", path("v1", "Event", meta["namespace"]), body)
        except ApiError as e:  # an Event is a courtesy; never fail a reconcile over one
            log.warning("could not post event %s: %s", reason, e)

    def nodes(self) -> list[Node] | None:
        """The watched nodes; None when nodes are not watched (the capacity is Unknown)."""
        return None if self.node_store is None else self.node_store.items()

    def secret_metadata(self, namespace: str, name: str) -> Body | None:
        """A Secret's metadata only (PartialObjectMetadata): the operator never needs, and so
        never receives, the data of a Secret."""
        return self._get_or_none(path("v1", "Secret", namespace, name), PARTIAL_METADATA)

    def create(self, manifest: Body) -> Body | None:
        """POST; None when the object already exists (409), which is never overwritten."""
        meta = manifest["metadata"]
        url = path(manifest["apiVersion"], manifest["kind"], meta["namespace"])
        try:
            return self.request("POST", url, manifest)
        except ApiError as e:
            if e.status == 409:
                return None
            raise
