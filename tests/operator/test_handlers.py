"""The kopf wiring: what is watched, with which filters, and that nothing needs a finalizer.

kopf's `KopfRunner` needs an API server to watch, so running the handlers inside kopf is
left to the e2e suite; here the registry is inspected and the handlers are called the way
kopf calls them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
from lmcache_operator import api, cli, handlers
from lmcache_operator.controller import Controller
from lmcache_operator.kube import Cache


def registered() -> tuple[kopf.OperatorRegistry, Controller]:
    registry = kopf.OperatorRegistry()
    controller = Controller(None, Cache())  # type: ignore[arg-type]
    handlers.register(registry, controller)
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
    assert children == {
        ("", "configmaps"),
        ("", "secrets"),
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
        "cache-secret",
        "cache-service",
        "cache-deployment",
        "cache-statefulset",
        "cache-networkpolicy",
    }
    raw = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "ml"}}
    asyncio.run(indexers["cache-configmap"].fn(body=kopf.Body(raw)))
    assert controller.cache.get(("v1", "ConfigMap", "ml", "c")) == raw
    assert len(controller.queue) == 0  # caching alone queues nothing


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


def test_probes_report_leadership_and_queue() -> None:
    registry, controller = registered()
    probes = {
        h.id: h.fn for h in registry._activities.get_all_handlers() if h.id in ("leading", "queued")
    }
    assert probes["leading"]() is False
    controller.queue.add(("ml", "d"))
    assert probes["queued"]() == 1


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
