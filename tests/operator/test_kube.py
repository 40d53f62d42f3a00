"""KubeCluster and LeaseElector over real HTTP, through the official client's transport.

The server is a small loopback HTTP server speaking the bits of the Kubernetes REST API the
operator uses (no kube-apiserver runs in the unit suite; the e2e suite uses a real one).
It checks what a real server would refuse: apply without fieldManager, a stale
resourceVersion on PUT, a create of an existing object.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client as k8s
from lmcache_operator import api
from lmcache_operator.kube import ApiError, Cache, KubeCluster
from lmcache_operator.leader import LeaseElector


class FakeApiServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.objects: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.fail_next: list[int] = []
        self.rv = 0
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: FakeApiServer

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        srv = self.server
        with srv.lock:
            srv.requests.append(
                {
                    "method": self.command,
                    "path": url.path,
                    "query": parse_qs(url.query),
                    "content_type": self.headers.get("Content-Type"),
                    "accept": self.headers.get("Accept"),
                    "body": body,
                }
            )
            if srv.fail_next:
                code = srv.fail_next.pop(0)
                return self._reply(code, {"kind": "Status", "message": f"injected {code}"})
            code, out = self._store(self.command, url.path, parse_qs(url.query), body)
        self._reply(code, out)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def _store(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, dict[str, Any]]:
        srv = self.server
        objs = srv.objects
        if method == "GET":
            if path in objs and "as=PartialObjectMetadata" in (self.headers.get("Accept") or ""):
                meta = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1"}
                return 200, {**meta, "metadata": objs[path]["metadata"]}
            if path in objs:
                return 200, objs[path]
            items = [o for p, o in objs.items() if p.startswith(path + "/")]
            if path.endswith(("/nodes", "/leases")):
                return 200, {"items": items}
            return 404, {"message": f"{path} not found"}
        if method == "DELETE":
            return (200, objs.pop(path)) if path in objs else (404, {"message": "not found"})
        srv.rv += 1
        if method == "POST":
            full = f"{path}/{body['metadata'].get('name') or 'generated-' + str(srv.rv)}"
            if full in objs:
                return 409, {"message": "AlreadyExists"}
            body["metadata"]["resourceVersion"] = str(srv.rv)
            objs[full] = body
            return 201, body
        if method == "PUT":
            current = objs.get(path)
            if current is None or current["metadata"]["resourceVersion"] != body["metadata"].get(
                "resourceVersion"
            ):
                return 409, {"message": "the object has been modified"}
            body["metadata"]["resourceVersion"] = str(srv.rv)
            objs[path] = body
            return 200, body
        # PATCH
        if self.headers.get("Content-Type") == "application/apply-patch+yaml":
            if "fieldManager" not in query:
                return 422, {"message": "fieldManager is required for apply"}
            body["metadata"]["resourceVersion"] = str(srv.rv)
            objs[path] = body
            return 200, body
        target = path.removesuffix("/status")
        if target not in objs:
            return 404, {"message": "not found"}
        objs[target] = {**objs[target], **body}
        return 200, objs[target]


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    srv = FakeApiServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def connect(server: FakeApiServer) -> KubeCluster:
    cfg = k8s.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    return KubeCluster(k8s.ApiClient(cfg), Cache())


def configmap(name: str = "c") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "ml"},
        "data": {"k": "v"},
    }


def test_apply_is_server_side_apply_with_our_field_manager(server: FakeApiServer) -> None:
    cluster = connect(server)
    live = cluster.apply(configmap())
    req = server.requests[-1]
    assert (req["method"], req["path"]) == ("PATCH", "/api/v1/namespaces/ml/configmaps/c")
    assert req["content_type"] == "application/apply-patch+yaml"
    assert req["query"] == {"fieldManager": [api.FIELD_MANAGER], "force": ["true"]}
    assert req["body"]["data"] == {"k": "v"}
    # The answer lands in the cache: the next read costs no request.
    count = len(server.requests)
    assert cluster.get("v1", "ConfigMap", "ml", "c") == live
    assert len(server.requests) == count


def test_get_misses_the_cache_then_reads_and_404_is_none(server: FakeApiServer) -> None:
    cluster = connect(server)
    assert cluster.get("apps/v1", "Deployment", "ml", "nope") is None
    assert server.requests[-1]["path"] == "/apis/apps/v1/namespaces/ml/deployments/nope"


def test_transient_errors_are_retried(server: FakeApiServer) -> None:
    cluster = connect(server)
    server.objects[f"/apis/{api.API_VERSION}/namespaces/ml/{api.PLURAL}/d"] = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "d", "namespace": "ml"},
    }
    server.fail_next = [409, 503]
    cluster.patch_status("ml", "d", {"phase": "Ready"})
    req = server.requests[-1]
    assert req["path"].endswith("/lmcachedeployments/d/status")
    assert req["content_type"] == "application/merge-patch+json"
    assert req["body"] == {"status": {"phase": "Ready"}}
    assert len(server.requests) == 3


def test_permanent_errors_are_not_retried(server: FakeApiServer) -> None:
    cluster = connect(server)
    server.fail_next = [422]
    with pytest.raises(ApiError, match="HTTP 422: injected 422"):
        cluster.apply(configmap())
    assert len(server.requests) == 1


def test_events_are_posted_and_never_fail_the_caller(server: FakeApiServer) -> None:
    cluster = connect(server)
    owner = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "d", "namespace": "ml", "uid": "u"},
    }
    cluster.event(owner, "Warning", "InvalidSpec", "bad")
    req = server.requests[-1]
    assert (req["method"], req["path"]) == ("POST", "/api/v1/namespaces/ml/events")
    assert req["body"]["involvedObject"]["uid"] == "u"
    assert (req["body"]["type"], req["body"]["reason"]) == ("Warning", "InvalidSpec")
    server.fail_next = [403]
    cluster.event(owner, "Normal", "Ready", "ok")  # logged, not raised


def test_secret_metadata_never_asks_for_the_data(server: FakeApiServer) -> None:
    cluster = connect(server)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "pw", "namespace": "ml"},
        "data": {"password": "czNjcmV0"},
    }
    assert cluster.create(secret) is not None
    assert cluster.create(secret) is None  # 409: it exists, and is left as it is
    meta = cluster.secret_metadata("ml", "pw")
    assert meta is not None and meta["metadata"]["name"] == "pw" and "data" not in meta
    get = server.requests[-1]
    assert get["accept"] == "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
    assert cluster.secret_metadata("ml", "missing") is None


def test_a_silent_server_fails_the_request_at_its_deadline() -> None:
    """A half-open connection: the server accepts and then never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        cfg = k8s.Configuration(host=f"http://127.0.0.1:{port}")
        cfg.retries = False
        cluster = KubeCluster(k8s.ApiClient(cfg), Cache(), timeout=0.5)
        with pytest.raises(ApiError) as err:
            cluster.get("v1", "ConfigMap", "ml", "c")
        assert err.value.status == 0 and "no answer" in str(err.value)
        assert cluster.unanswered_for() > 0


def test_unanswered_for_counts_from_the_last_answer(server: FakeApiServer) -> None:
    now = [10.0]
    cfg = k8s.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    cluster = KubeCluster(k8s.ApiClient(cfg), Cache(), clock=lambda: now[0])
    server.fail_next = [500]
    with pytest.raises(ApiError):
        cluster.request("GET", "/api/v1/namespaces/ml/configmaps/c")
    assert cluster.unanswered_for() == 0.0  # an error is an answer
    cluster.api.configuration.host = "http://127.0.0.1:1"  # nothing listens there
    now[0] = 40.0
    with pytest.raises(ApiError):
        cluster.request("GET", "/api/v1/namespaces/ml/configmaps/c")
    assert cluster.unanswered_for() == 30.0


# --- leader election -----------------------------------------------------------------------


class Clock:
    """One replica's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def electors(server: FakeApiServer) -> tuple[LeaseElector, Clock, LeaseElector, Clock]:
    cluster = connect(server)
    ca, cb = Clock(), Clock()
    return (
        LeaseElector(cluster, "ops", "lmcache-operator", "a", duration=15, clock=ca),
        ca,
        LeaseElector(cluster, "ops", "lmcache-operator", "b", duration=15, clock=cb),
        cb,
    )


def lease(server: FakeApiServer) -> dict[str, Any]:
    return server.objects["/apis/coordination.k8s.io/v1/namespaces/ops/leases/lmcache-operator"]


def test_first_replica_creates_the_lease_and_keeps_renewing(server: FakeApiServer) -> None:
    a, ca, b, cb = electors(server)
    assert a.try_acquire()
    assert lease(server)["spec"]["holderIdentity"] == "a"
    assert not b.try_acquire()  # b first sees a's record now
    cb.now += 10
    ca.now += 10
    assert a.try_acquire()  # renewed: a new record
    cb.now += 10
    assert not b.try_acquire()  # 20 s after b first saw a, but 10 s after the renewal
    assert lease(server)["spec"]["holderIdentity"] == "a"


def test_standby_takes_over_when_the_record_stops_changing(server: FakeApiServer) -> None:
    a, _, b, cb = electors(server)
    assert a.try_acquire()
    assert not b.try_acquire()
    cb.now += 16
    assert b.try_acquire()
    spec = lease(server)["spec"]
    assert spec["holderIdentity"] == "b"
    assert spec["leaseTransitions"] == 1


def test_expiry_is_judged_by_the_local_clock_not_the_holders_renew_time(
    server: FakeApiServer,
) -> None:
    """The holder's renewTime comes from another machine's clock: a skewed one must neither
    hand the lease over early nor keep it forever."""
    a, _, b, cb = electors(server)
    assert a.try_acquire()
    path = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/lmcache-operator"
    server.objects[path]["spec"]["renewTime"] = "2001-01-01T00:00:00.000000Z"  # far behind
    assert not b.try_acquire()  # an old renewTime is not an expired lease
    server.objects[path]["spec"]["renewTime"] = "2099-01-01T00:00:00.000000Z"  # far ahead
    cb.now += 5
    assert not b.try_acquire()  # a new record: b waits a full duration from now
    cb.now += 16
    assert b.try_acquire()  # not "valid until 2099"


def test_leader_stops_leading_when_renewals_fail_past_the_deadline(
    server: FakeApiServer,
) -> None:
    a, ca, _, _ = electors(server)
    assert a.try_acquire() and a.leading()
    server.fail_next = [503] * 10
    ca.now += 5
    assert a.try_acquire()  # a failed renewal within the deadline: still leading
    ca.now += 5.5
    assert not a.try_acquire()  # 10.5 s since the last renewal > renew_deadline 10 s
    assert not a.leading()
    assert a.renew_deadline < a.duration  # it stops before anyone may take over


def test_a_lost_write_race_is_not_leadership(server: FakeApiServer) -> None:
    a, _, b, cb = electors(server)
    assert a.try_acquire()
    assert not b.try_acquire()
    cb.now += 16
    # b reads the expired lease, then a renews before b writes: b's PUT carries a stale
    # resourceVersion and the server refuses it.
    original = b.cluster.request

    def racing(method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        if method == "PUT":
            assert a.try_acquire()
        return original(method, path, *args, **kwargs)

    b.cluster = type("C", (), {"request": staticmethod(racing)})()  # type: ignore[assignment]
    assert not b.try_acquire()
    assert lease(server)["spec"]["holderIdentity"] == "a"


def test_released_lease_is_taken_at_once(server: FakeApiServer) -> None:
    a, _, b, _ = electors(server)
    assert a.try_acquire()
    b.release()  # not the holder: a no-op
    assert lease(server)["spec"]["holderIdentity"] == "a"
    a.release()
    assert not a.leading()
    assert b.try_acquire()
    assert lease(server)["spec"]["holderIdentity"] == "b"
