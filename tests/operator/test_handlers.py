"""The kopf wiring: what is watched, with which filters, and that nothing needs a finalizer.

kopf's `KopfRunner` needs an API server to watch, so running the handlers inside kopf is
left to the e2e suite; here the registry is inspected and the handlers are called the way
kopf calls them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import kopf
import pytest
from lmcache_operator import api, cli, handlers
from lmcache_operator.controller import Controller
from lmcache_operator.kube import Cache, Nodes


def registered(nodes: Nodes | None = None) -> tuple[kopf.OperatorRegistry, Controller]:
    registry = kopf.OperatorRegistry()
    controller = Controller(None, Cache())  # type: ignore[arg-type]
    handlers.register(registry, controller, nodes=nodes)
    return registry, controller


def test_watches_the_crd_and_only_labelled_children() -> None:
    registry, _ = registered()
    watched = {h.id: h for h in registry._watching.get_all_handlers()}
    owner = watched["watch-owner"]
    assert (owner.selector.group, owner.selector.version) == (api.GROUP, api.VERSION)
    assert owner.labels is None
    children = {
        (h.selector.group, h.selector.plural) for i, h in watched.items() if i != "watch-owner"
    }
    # Secrets are not watched: RBAC cannot narrow list/watch to labelled ones.
    assert children == {
        ("", "configmaps"),
        ("", "services"),
        ("apps", "deployments"),
        ("apps", "statefulsets"),
        ("networking.k8s.io", "networkpolicies"),
    }
    for i, h in watched.items():
        if i != "watch-owner":
            assert h.labels == {api.LABEL_MANAGED_BY: api.MANAGED_BY}, i


def test_children_are_indexed_so_the_cache_is_full_before_any_reconcile() -> None:
    registry, controller = registered()
    indexers = {h.id: h for h in registry._indexing.get_all_handlers()}
    assert set(indexers) == {
        "cache-configmap",
        "cache-service",
        "cache-deployment",
        "cache-statefulset",
        "cache-networkpolicy",
    }
    raw = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "ml"}}
    asyncio.run(indexers["cache-configmap"].fn(body=kopf.Body(raw)))
    assert controller.cache.get(("v1", "ConfigMap", "ml", "c")) == raw
    assert len(controller.queue) == 0  # caching alone queues nothing


def test_nodes_are_indexed_and_parsed_once_per_event_when_readable() -> None:
    nodes = Nodes()
    registry, _ = registered(nodes)
    indexers = {h.id: h for h in registry._indexing.get_all_handlers()}
    watched = {h.id: h for h in registry._watching.get_all_handlers()}
    assert (indexers["cache-node"].selector.plural, watched["watch-node"].selector.plural) == (
        "nodes",
        "nodes",
    )
    raw = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "n1", "labels": {"gpu": "yes"}},
        "status": {"allocatable": {"nvidia.com/gpu": "8", "memory": "1Ti", "cpu": "96"}},
    }
    asyncio.run(indexers["cache-node"].fn(body=kopf.Body(raw)))
    [node] = nodes.items()
    assert (node.name, node.allocatable["nvidia.com/gpu"], node.allocatable["cpu"]) == (
        "n1",
        8,
        96000,
    )
    asyncio.run(watched["watch-node"].fn(event={"type": "DELETED"}, body=kopf.Body(raw)))
    assert nodes.items() == []
    # Without RBAC on nodes (--no-read-nodes) nothing watches them.
    registry, _ = registered(None)
    assert not any(h.id.endswith("-node") for h in registry._watching.get_all_handlers())
    assert not any(h.id.endswith("-node") for h in registry._indexing.get_all_handlers())


def test_no_handler_needs_a_finalizer_or_writes_progress() -> None:
    """Deleting a deployment must never wait for the operator: no timers, daemons or
    change handlers (kopf adds finalizers and progress annotations for those)."""
    registry, _ = registered()
    assert registry._spawning.get_all_handlers() == []
    assert registry._changing.get_all_handlers() == []


def test_handlers_feed_the_controller_as_kopf_calls_them() -> None:
    registry, controller = registered()
    watched = {h.id: h for h in registry._watching.get_all_handlers()}
    raw: dict[str, Any] = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "d", "namespace": "ml", "uid": "u", "generation": 1},
        "spec": {"model": "m"},
    }
    asyncio.run(watched["watch-owner"].fn(event={"type": None, "object": raw}, body=kopf.Body(raw)))
    assert len(controller.queue) == 1
    assert controller.cache.get((api.API_VERSION, api.KIND, "ml", "d")) is not None
    asyncio.run(
        watched["watch-owner"].fn(event={"type": "DELETED", "object": raw}, body=kopf.Body(raw))
    )
    assert controller.cache.get((api.API_VERSION, api.KIND, "ml", "d")) is None


def test_startup_configures_kopf_for_least_privilege_and_own_events() -> None:
    registry, controller = registered()
    start = next(h.fn for h in registry._activities.get_all_handlers() if h.id.endswith("start"))
    settings = kopf.OperatorSettings()

    async def scenario() -> None:
        await start(settings=settings)
        try:
            assert controller.leading.is_set()  # no elector: this process leads
        finally:
            await controller.stop()

    asyncio.run(scenario())
    assert settings.scanning.disabled  # no RBAC on namespaces/CRDs needed
    assert not settings.posting.enabled
    # A watch on a dead connection ends instead of waiting forever for its next event.
    assert settings.watching.server_timeout == 60  # timeoutSeconds must be an integer
    assert isinstance(settings.watching.server_timeout, int)
    assert settings.watching.client_timeout == 60 + 30.0
    assert settings.networking.request_timeout == 30.0


def test_probes_report_leadership_and_queue() -> None:
    registry, controller = registered()
    probes = {h.id: h.fn for h in registry._activities.get_all_handlers()}
    assert probes["leading"]() is False
    controller.queue.add(("ml", "d"))
    assert probes["queued"]() == 1
    assert probes["healthy"]() is True


def test_liveness_fails_on_a_stuck_reconcile_or_a_silent_api_server() -> None:
    """kopf answers /healthz with 500 when a probe raises a PermanentError (a plain
    exception would be retried, and the probe request would hang)."""
    now = [100.0]
    silence = [0.0]
    controller = Controller(
        None,  # type: ignore[arg-type]
        Cache(),
        reconcile_timeout=60,
        api_timeout=30,
        api_silence=lambda: silence[0],
        clock=lambda: now[0],
    )
    registry = kopf.OperatorRegistry()
    handlers.register(registry, controller)
    probe = next(h.fn for h in registry._activities.get_all_handlers() if h.id == "healthy")
    controller._running[("ml", "slow")] = 50.0
    assert probe() is True  # 50 s in: within its deadline
    now[0] = 111.0
    with pytest.raises(kopf.PermanentError, match="ml/slow has run for 61s"):
        probe()
    del controller._running[("ml", "slow")]
    silence[0] = 31.0
    with pytest.raises(kopf.PermanentError, match="not answered for 31s"):
        probe()
    silence[0] = 0.0
    assert probe() is True


def test_cli_flags_for_out_of_cluster_runs() -> None:
    args = cli.parse_args(
        [
            "-n",
            "a",
            "-n",
            "b",
            "--health-port",
            "0",
            "--metrics-port",
            "9999",
            "--leader-election",
            "--log-format",
            "json",
            "--workers",
            "2",
        ]
    )
    assert args.namespace == ["a", "b"]
    assert (args.health_port, args.metrics_port, args.workers) == (0, 9999, 2)
    assert args.leader_election and args.log_format == "json"
    defaults = cli.parse_args([])
    assert defaults.namespace == [] and not defaults.leader_election
    assert (defaults.health_port, defaults.metrics_port) == (8080, 9090)
    assert (defaults.request_timeout, defaults.read_nodes) == (30.0, True)
    assert cli.parse_args(["--no-read-nodes"]).read_nodes is False


def test_client_has_no_transport_retries(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib3's default retries would repeat a timed-out GET three times: 4x the deadline."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    client = cli.api_client(str(path))
    assert client.configuration.retries is False
