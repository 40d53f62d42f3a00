"""Watch events in, reconciles out: the cache, the work queue, the workers and the leader loop.

kopf delivers watch events; the controller turns them into queued keys and runs a bounded
number of reconciles in threads (the official client is synchronous). Reconciles happen
only while this replica leads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lmcache_operator import api, metrics
from lmcache_operator.kube import Cache
from lmcache_operator.leader import LeaseElector
from lmcache_operator.reconcile import Reconciler
from lmcache_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

Key = tuple[str, str]


def owner_key(body: Mapping[str, Any]) -> Key | None:
    """The `LMCacheDeployment` controlling a child, from its owner references."""
    meta = body.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == api.KIND and ref.get("controller"):
            return (meta.get("namespace", ""), ref["name"])
    return None


def _essence(body: Mapping[str, Any] | None) -> Any:
    """What the user controls; a change elsewhere (our own status patch) needs no reconcile."""
    if body is None:
        return None
    meta = body.get("metadata") or {}
    return (
        meta.get("generation"),
        meta.get("uid"),
        meta.get("deletionTimestamp"),
        body.get("spec"),
    )


class Controller:
    def __init__(
        self,
        reconciler: Reconciler,
        cache: Cache,
        workers: int = 4,
        resync: float = 60.0,
        elector: LeaseElector | None = None,
        reconcile_timeout: float = 300.0,
        api_timeout: float = 120.0,
        api_silence: Callable[[], float] = lambda: 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reconciler = reconciler
        self.cache = cache
        self.workers = workers
        self.resync = resync
        self.elector = elector
        self.reconcile_timeout = reconcile_timeout
        self.api_timeout = api_timeout
        self._api_silence = api_silence
        self._clock = clock
        self.queue: WorkQueue[Key] = WorkQueue()
        self.leading = asyncio.Event()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="reconcile")
        self._tasks: list[asyncio.Task[None]] = []
        self._running: dict[Key, float] = {}  # in-flight reconciles and when they started

    def health(self) -> str | None:
        """Why this process should be restarted, or None: a reconcile stuck past its
        deadline (a worker that will never come back), or an API server that has not
        answered any request for `api_timeout` seconds (connections that will never
        recover by themselves)."""
        now = self._clock()
        for (ns, name), started in list(self._running.items()):
            if now - started > self.reconcile_timeout:
                return (
                    f"the reconcile of {ns}/{name} has run for {now - started:.0f}s "
                    f"(limit {self.reconcile_timeout:.0f}s)"
                )
        silence = self._api_silence()
        if silence > self.api_timeout:
            return (
                f"the API server has not answered for {silence:.0f}s "
                f"(limit {self.api_timeout:.0f}s)"
            )
        return None

    async def start(self) -> None:
        if self.elector is None:
            self._lead(True)
        else:
            self._tasks.append(asyncio.create_task(self._elect(), name="leader-election"))
        for i in range(self.workers):
            self._tasks.append(asyncio.create_task(self._work(), name=f"reconcile-worker-{i}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.elector is not None and self.leading.is_set():
            self.leading.clear()
            metrics.LEADER.set(0)
            await asyncio.get_running_loop().run_in_executor(None, self.elector.release)

    def observe_owner(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if event_type == "DELETED":
            self.cache.drop(body)
            self.queue.forget(key)
            return
        before = self.cache.get((api.API_VERSION, api.KIND, key[0], key[1]))
        self.cache.put(body)
        if _essence(before) != _essence(body):
            self.queue.add(key)

    def observe_child(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Drift (a hand edit, a deletion) and workload status changes requeue the owner;
        the initial listing does not, since the owner's own listing already queues it."""
        if event_type == "DELETED":
            self.cache.drop(body)
        else:
            self.cache.put(body)
        key = owner_key(body)
        if key and event_type is not None:
            self.queue.add(key)

    def _lead(self, leading: bool) -> None:
        if leading == self.leading.is_set():
            return
        metrics.LEADER.set(1 if leading else 0)
        if leading:
            log.info("leading: reconciling")
            self.leading.set()
            for key in self.cache.keys(api.API_VERSION, api.KIND):
                self.queue.add(key)
        else:
            log.warning("lost the leader lease: reconciles paused")
            self.leading.clear()

    async def _elect(self) -> None:
        """Renew every retry period; leadership ends at the renew deadline even while a
        renewal is still hanging, not when it finally returns."""
        elector = self.elector
        assert elector is not None
        loop = asyncio.get_running_loop()
        while True:
            renewal = loop.run_in_executor(None, elector.try_acquire)
            while not renewal.done():
                await asyncio.wait({renewal}, timeout=0.5)
                self._lead(elector.leading())
            self._lead(renewal.result())
            await asyncio.sleep(elector.retry_period)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key = await self.queue.get()
            try:
                await self.leading.wait()
                started = self._running[key] = self._clock()
                try:
                    exists = await loop.run_in_executor(
                        self._executor, self.reconciler.reconcile, *key
                    )
                except Exception as e:
                    metrics.RECONCILES.labels(result="error").inc()
                    delay = self.queue.retry(key)
                    log.warning("reconcile %s/%s failed (retry in %.0fs): %s", *key, delay, e)
                else:
                    metrics.RECONCILES.labels(result="ok").inc()
                    self.queue.succeeded(key)
                    if exists:
                        self.queue.add_after(key, self.resync)
                finally:
                    self._running.pop(key, None)
                    metrics.RECONCILE_SECONDS.observe(self._clock() - started)
            finally:
                self.queue.done(key)
