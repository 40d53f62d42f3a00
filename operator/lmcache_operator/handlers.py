"""kopf wiring: watch streams feed the controller; kopf also serves the health endpoint.

Only watch (`on.event`) and index handlers are used, on purpose: they need no finalizer and
kopf writes nothing to the objects (no progress annotations), so deleting a deployment never
waits for the operator and an unchanged cluster sees no writes at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kopf

from lmcache_operator import api, kube
from lmcache_operator.controller import Controller
from lmcache_operator.kube import CHILD_KINDS, PLURALS, Nodes


def register(
    registry: kopf.OperatorRegistry,
    controller: Controller,
    login: Callable[[], kopf.ConnectionInfo] | None = None,
    request_timeout: float = 30.0,
    watch_timeout: int = 60,
    nodes: Nodes | None = None,
) -> None:
    """`login` gives kopf the credentials the reconciler's client uses, so both always talk
    to the same cluster as the same user; `nodes`, when given, is kept current from a watch."""
    if login is not None:

        @kopf.on.login(registry=registry)
        def credentials(**_: Any) -> kopf.ConnectionInfo:
            return login()

    @kopf.on.startup(registry=registry)
    async def start(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # the reconciler posts its own, meaningful Events
        # Serve the CRD and namespaces known at start-up; watching CRDs and namespaces for
        # changes would need cluster-wide RBAC on both, for no use to this operator.
        settings.scanning.disabled = True
        # A watch on a half-open connection would wait forever for its next event: the
        # server ends each watch after server_timeout (whole seconds: the API server's
        # timeoutSeconds), and the client gives up a little later.
        settings.watching.connect_timeout = kube.connect_timeout(request_timeout)
        settings.watching.server_timeout = watch_timeout
        settings.watching.client_timeout = watch_timeout + request_timeout
        settings.networking.connect_timeout = kube.connect_timeout(request_timeout)
        settings.networking.request_timeout = request_timeout
        await controller.start()

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        await controller.stop()

    @kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, id="watch-owner", registry=registry)
    async def owner_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        controller.observe_owner(event.get("type"), body)

    async def child_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        controller.observe_child(event.get("type"), body)

    async def cache_child(body: kopf.Body, **_: Any) -> None:
        # An index handler: kopf runs these for every listed object before any other handler,
        # so the first reconciles find every existing child in the cache instead of GETting it.
        controller.cache.put(body)

    for api_version, kind in CHILD_KINDS:
        group, _, version = api_version.rpartition("/")
        plural = PLURALS[(api_version, kind)]
        labels = {api.LABEL_MANAGED_BY: api.MANAGED_BY}
        index = kopf.index(
            group=group,
            version=version,
            plural=plural,
            labels=labels,
            id=f"cache-{kind.lower()}",
            registry=registry,
        )
        watch = kopf.on.event(
            group=group,
            version=version,
            plural=plural,
            labels=labels,
            id=f"watch-{kind.lower()}",
            registry=registry,
        )
        index(cache_child)
        watch(child_event)

    if nodes is not None:
        # kopf calls index handlers for every listed and changed object before any other
        # handler (so the first reconciles see every node), but not for deletions. Nodes are
        # parsed once per change; a reconcile then only compares numbers.

        @kopf.index(group="", version="v1", plural="nodes", id="cache-node", registry=registry)
        async def cache_node(body: kopf.Body, **_: Any) -> None:
            nodes.put(body)

        @kopf.on.event(group="", version="v1", plural="nodes", id="watch-node", registry=registry)
        async def node_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
            if event.get("type") == "DELETED":
                nodes.drop(body)

    @kopf.on.probe(id="healthy", registry=registry)
    def healthy(**_: Any) -> bool:
        # A PermanentError fails the probe at once (kopf answers 500), with no retries.
        if problem := controller.health():
            raise kopf.PermanentError(problem)
        return True

    @kopf.on.probe(id="leading", registry=registry)
    def leading(**_: Any) -> bool:
        return controller.leading.is_set()

    @kopf.on.probe(id="queued", registry=registry)
    def queued(**_: Any) -> int:
        return len(controller.queue)
