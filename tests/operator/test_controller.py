"""The work queue and the controller: coalescing, bounded concurrency, leader gating.

Waits are on conditions with a deadline (`until`), never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
from lmcache_operator import api
from lmcache_operator.controller import Controller, owner_key
from lmcache_operator.kube import Cache
from lmcache_operator.workqueue import WorkQueue

DEADLINE = 10.0


async def until(predicate: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)  # yield to the loop between checks of the condition


def cr(name: str, generation: int = 1, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": "ml", "uid": f"u-{name}", "generation": generation},
        "spec": {"model": "m", "replicas": generation},
        "status": status or {},
    }


def child(owner: str, kind: str = "Deployment") -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {
            "name": owner,
            "namespace": "ml",
            "ownerReferences": [
                {"kind": api.KIND, "name": owner, "uid": f"u-{owner}", "controller": True}
            ],
        },
    }


class RecordingReconciler:
    """Counts calls and concurrency; blocks on `gate` so overlap can be observed."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.active = 0
        self.peak = 0
        self.gate = threading.Event()
        self.gate.set()
        self.fail = fail or set()
        self._lock = threading.Lock()

    def reconcile(self, namespace: str, name: str) -> bool:
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            assert self.gate.wait(DEADLINE)
            if name in self.fail:
                raise RuntimeError("boom")
            return True
        finally:
            with self._lock:
                self.active -= 1
                self.calls.append((namespace, name))


def make(reconciler: RecordingReconciler, workers: int = 4, elector: Any = None) -> Controller:
    return Controller(reconciler, Cache(), workers=workers, resync=3600, elector=elector)  # type: ignore[arg-type]


# --- WorkQueue -----------------------------------------------------------------------------


def test_queue_coalesces_and_requeues_keys_changed_while_active() -> None:
    async def scenario() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        q.add("a")
        q.add("b")
        assert len(q) == 2
        key = await q.get()
        assert key == "a"
        q.add("a")  # changed while a worker has it
        assert len(q) == 1
        q.done("a")
        assert len(q) == 2
        assert await q.get() == "b"

    asyncio.run(scenario())


@pytest.mark.parametrize("first,second", [(0.01, 3600.0), (3600.0, 0.01)])
def test_queue_earliest_delayed_add_wins(first: float, second: float) -> None:
    async def scenario() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add_after("k", first)
        q.add_after("k", second)
        assert await asyncio.wait_for(q.get(), DEADLINE) == "k"

    asyncio.run(scenario())


def test_queue_retry_backs_off_exponentially_until_success() -> None:
    async def scenario() -> None:
        q: WorkQueue[str] = WorkQueue()
        assert [q.retry("k", base=1, cap=5) for _ in range(5)] == [1, 2, 4, 5, 5]
        q.succeeded("k")
        assert q.retry("k", base=1, cap=5) == 1
        q.forget("k")

    asyncio.run(scenario())


# --- Controller ----------------------------------------------------------------------------


def test_startup_with_100_deployments_runs_at_most_workers_reconciles_at_once() -> None:
    async def scenario() -> None:
        rec = RecordingReconciler()
        rec.gate.clear()
        ctl = make(rec, workers=4)
        for i in range(100):
            ctl.observe_owner(None, cr(f"d{i}"))
        await ctl.start()
        try:
            await until(lambda: rec.active == 4, "four reconciles in flight")
            assert len(ctl.queue) == 96  # the rest wait their turn
            rec.gate.set()
            await until(lambda: len(rec.calls) == 100, "all reconciles")
        finally:
            await ctl.stop()
        assert rec.peak == 4
        assert sorted(rec.calls) == sorted(("ml", f"d{i}") for i in range(100))

    asyncio.run(scenario())


def test_own_status_patches_do_not_trigger_reconciles() -> None:
    ctl = make(RecordingReconciler())
    ctl.observe_owner(None, cr("a"))
    assert len(ctl.queue) == 1
    ctl.queue = WorkQueue()
    ctl.observe_owner("MODIFIED", cr("a", status={"phase": "Ready"}))
    assert len(ctl.queue) == 0
    ctl.observe_owner("MODIFIED", cr("a", generation=2))
    assert len(ctl.queue) == 1


def test_child_events_requeue_the_owner_but_not_on_initial_listing() -> None:
    ctl = make(RecordingReconciler())
    ctl.observe_child(None, child("a"))
    assert len(ctl.queue) == 0
    assert ctl.cache.get(("apps/v1", "Deployment", "ml", "a")) is not None
    ctl.observe_child("MODIFIED", child("a"))
    ctl.observe_child("MODIFIED", child("a", "StatefulSet"))
    assert len(ctl.queue) == 1  # coalesced
    ctl.observe_child("DELETED", child("a"))
    assert ctl.cache.get(("apps/v1", "Deployment", "ml", "a")) is None


def test_owner_key_needs_a_controller_reference() -> None:
    assert owner_key(child("a")) == ("ml", "a")
    orphan = child("a")
    orphan["metadata"]["ownerReferences"][0]["controller"] = False
    assert owner_key(orphan) is None


def test_failed_reconcile_is_retried_and_others_continue() -> None:
    async def scenario() -> None:
        rec = RecordingReconciler(fail={"bad"})
        ctl = make(rec, workers=2)
        ctl.observe_owner(None, cr("bad"))
        ctl.observe_owner(None, cr("good"))
        await ctl.start()
        try:
            await until(lambda: rec.calls.count(("ml", "bad")) >= 2, "a retry of the failure")
            assert ("ml", "good") in rec.calls
        finally:
            await ctl.stop()

    asyncio.run(scenario())


class FlipElector:
    """Follower until `lead` is set; counts rounds so the test can wait on them."""

    retry_period = 0.01

    def __init__(self) -> None:
        self.lead = False
        self.rounds = 0

    def leading(self) -> bool:
        return self.lead

    def try_acquire(self) -> bool:
        self.rounds += 1
        return self.lead


def test_only_the_leader_reconciles() -> None:
    async def scenario() -> None:
        rec = RecordingReconciler()
        elector = FlipElector()
        ctl = make(rec, elector=elector)
        ctl.observe_owner(None, cr("a"))
        await ctl.start()
        try:
            await until(lambda: elector.rounds >= 3, "three election rounds as follower")
            assert rec.calls == []
            elector.lead = True
            await until(lambda: ("ml", "a") in rec.calls, "the reconcile once leading")
            elector.lead = False
            await until(lambda: not ctl.leading.is_set(), "losing the lease")
        finally:
            await ctl.stop()

    asyncio.run(scenario())


def test_cache_drops_managed_fields() -> None:
    cache = Cache()
    body = child("a")
    body["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    cache.put(body)
    stored = cache.get(("apps/v1", "Deployment", "ml", "a"))
    assert stored is not None and "managedFields" not in stored["metadata"]
    assert "managedFields" in body["metadata"]  # the caller's object is untouched


def test_cache_indexes_children_by_owner() -> None:
    """Pruning asks for one owner's children: a lookup, not a scan of every cached object."""
    cache = Cache()
    cache.put(child("a"))
    cache.put(child("a", kind="StatefulSet"))
    cache.put(child("b"))
    assert sorted(c["kind"] for c in cache.owned("u-a")) == ["Deployment", "StatefulSet"]
    moved = child("a", kind="StatefulSet")
    moved["metadata"]["ownerReferences"][0]["uid"] = "u-b"  # re-owned: re-indexed
    cache.put(moved)
    assert [c["kind"] for c in cache.owned("u-a")] == ["Deployment"]
    cache.drop(child("a"))
    assert cache.owned("u-a") == []
    assert len(cache.owned("u-b")) == 2
