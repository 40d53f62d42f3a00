"""The operator under network faults, against the real API server: a frozen connection (a TCP
proxy that stops forwarding, see e2e/proxy.py) and a leader whose renewals hang.

These tests run their own operator processes with short deadlines, so the session's operator is
stopped for their duration (two operators reconciling the same objects would prove nothing).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import yaml

from e2e import lmcd
from e2e.cluster import NodeShape
from e2e.kube import Cluster, Kube, wait_for
from e2e.operator_proc import OperatorProcess, Release
from e2e.proxy import FreezableProxy

# Short deadlines, so each fault shows within seconds: request 2 s, API silence 8 s.
FAST = (
    "--request-timeout=2",
    "--api-timeout=8",
    "--watch-timeout=10",
    "--resync-seconds=2",
)


@pytest.fixture
def alone(operator: OperatorProcess) -> Iterator[None]:
    """The session's operator is stopped (its Lease released) and restarted afterwards."""
    operator.stop()
    try:
        yield
    finally:
        operator.start()


def api_port(kube: Cluster) -> int:
    config = yaml.safe_load(kube.kubeconfig.read_text())
    port = urlsplit(config["clusters"][0]["cluster"]["server"]).port
    assert port, config["clusters"][0]["cluster"]["server"]
    return port


def replica(
    kube: Cluster, release: Release, proxy: FreezableProxy | None, name: str
) -> OperatorProcess:
    return OperatorProcess(
        kube,
        release.namespace,
        release.deployment,
        extra_args=(*FAST, f"--identity={name}"),
        server=proxy.url if proxy else None,
        instance=f"{name}-{uuid.uuid4().hex[:4]}",
    )


def password_secret(k8s: Kube, namespace: str) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "valkey-pw"}}
    k8s.create({**secret, "stringData": {"password": "s3cret"}}, namespace)


def test_frozen_api_server_times_out_fails_liveness_and_recovers(
    kube: Cluster,
    k8s: Kube,
    release: Release,
    alone: None,
    namespace: str,
    fake_nodes: list[NodeShape],
) -> None:
    # An existingSecret makes every reconcile ask the API server for its metadata: with a 2 s
    # resync, a reconcile is always about to send a request into the frozen connection.
    password_secret(k8s, namespace)
    spec = {"valkey": {"enabled": True, "auth": {"existingSecret": "valkey-pw"}}}
    with FreezableProxy(api_port(kube)) as proxy:
        op = replica(kube, release, proxy, "frozen")
        op.start()
        try:
            k8s.create(lmcd.manifest("before", **spec), namespace)
            lmcd.wait_observed(k8s, "before", namespace)
            assert op.metric("lmcache_operator_api_requests_total", 'code="none"') == 0
            errors = op.metric("lmcache_operator_reconciles_total", 'result="error"')
            proxy.freeze()
            started = time.monotonic()

            # The reconcile worker is not hung: its request fails at the 2 s deadline, the
            # reconcile ends as an error and is retried, again and again.
            wait_for(
                "reconciles failing on unanswered requests",
                lambda: (
                    op.metric("lmcache_operator_reconciles_total", 'result="error"') >= errors + 2
                ),
                timeout=30,
            )
            assert op.metric("lmcache_operator_api_requests_total", 'code="none"') >= 2
            assert "no answer" in op.log_tail(200)
            # Leadership ends at the renew deadline (10 s), not when a renewal returns.
            wait_for("leadership given up", lambda: op.metric("lmcache_operator_leader") == 0, 30)
            # Liveness: 8 s without any answer fails /healthz, so the kubelet would restart it.
            wait_for("/healthz failing", lambda: op.health() == 500, timeout=30)
            assert time.monotonic() - started >= 8

            proxy.thaw()  # new connections work; the frozen ones stay dead
            wait_for("/healthz healthy again", lambda: op.health() == 200, timeout=30)
            wait_for("leading again", lambda: op.metric("lmcache_operator_leader") == 1, 30)
            # Its watches were on frozen connections: they are replaced (watch timeout 10 s +
            # request timeout 2 s), so a new object is seen and reconciled.
            k8s.create(lmcd.manifest("after", **spec), namespace)
            lmcd.wait_observed(k8s, "after", namespace, timeout=60)
        finally:
            proxy.thaw()
            op.stop()


def test_leader_with_hanging_renewals_steps_down_before_the_standby_takes_over(
    kube: Cluster,
    k8s: Kube,
    release: Release,
    alone: None,
    namespace: str,
    fake_nodes: list[NodeShape],
) -> None:
    with FreezableProxy(api_port(kube)) as proxy:
        leader = replica(kube, release, proxy, "leader")
        standby = replica(kube, release, None, "standby")
        leader.start()
        try:
            wait_for("the first replica leads", lambda: leader.metric("lmcache_operator_leader"))
            standby.start()
            k8s.create(lmcd.manifest("one"), namespace)
            lmcd.wait_ready(k8s, "one", namespace)
            assert standby.metric("lmcache_operator_leader") == 0
            assert standby.metric("lmcache_operator_reconciles_total") == 0

            proxy.freeze()  # the leader's renewals now hang
            stepped_down = took_over = None
            deadline = time.monotonic() + 60
            while took_over is None and time.monotonic() < deadline:
                now = time.monotonic()
                if stepped_down is None and leader.metric("lmcache_operator_leader") == 0:
                    stepped_down = now
                if standby.metric("lmcache_operator_leader") == 1:
                    took_over = now
                time.sleep(0.2)
            assert took_over is not None, "the standby never took over"
            assert stepped_down is not None and stepped_down < took_over, (
                "two replicas believed they led at once"
            )

            # The new leader reconciles what the old one never saw.
            k8s.create(lmcd.manifest("two"), namespace)
            lmcd.wait_ready(k8s, "two", namespace)
            assert standby.metric("lmcache_operator_reconciles_total") > 0
            lease = k8s.get(
                "coordination.k8s.io/v1", "Lease", release.deployment, release.namespace
            )
            assert lease and lease["spec"]["holderIdentity"] == "standby"
        finally:
            proxy.thaw()
            leader.stop()
            standby.stop()
