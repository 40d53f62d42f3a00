"""Leader election on a `coordination.k8s.io` Lease, as Kubernetes' own controllers do.

Every replica watches and caches; only the holder of the Lease reconciles. The rules are
client-go's:

- a Lease held by another replica expires `leaseDurationSeconds` after *this* replica last
  saw its record change, by this replica's own clock: the holder's `renewTime` is another
  machine's clock and is never compared with ours;
- a leader that cannot renew for `renew_deadline` seconds (shorter than the lease duration)
  stops leading, so it has stopped before a standby may take over;
- writes carry the Lease's resourceVersion, so two replicas can never both win a term.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from lmcache_operator.kube import ApiError, KubeCluster, path

log = logging.getLogger(__name__)


def _stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LeaseElector:
    cluster: KubeCluster
    namespace: str
    name: str
    identity: str
    duration: int = 15
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    clock: Callable[[], float] = time.monotonic
    # The last record seen (holder, renewTime, resourceVersion) and when, by our clock.
    _observed: tuple[Any, ...] | None = field(default=None, init=False)
    _observed_at: float = field(default=0.0, init=False)
    _renewed_at: float | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return path("coordination.k8s.io/v1", "Lease", self.namespace, self.name)

    def _body(self, spec: dict[str, Any], rv: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if rv:
            meta["resourceVersion"] = rv
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": spec,
        }

    @property
    def _timeout(self) -> float:
        """A round (GET + write) ends within the renew deadline, as client-go's does."""
        return self.renew_deadline / 2

    def leading(self) -> bool:
        """True while the last successful renewal is younger than the renew deadline."""
        return self._renewed_at is not None and (
            self.clock() - self._renewed_at < self.renew_deadline
        )

    def try_acquire(self) -> bool:
        """One round: create, renew or take over the Lease. Returns `leading()` after it."""
        if self._round():
            self._renewed_at = self.clock()
        return self.leading()

    def _round(self) -> bool:
        try:
            lease = self.cluster.request("GET", self.url, timeout=self._timeout)
        except ApiError as e:
            if e.status != 404:
                log.warning("leader election: %s", e)
                return False
            lease = None
        spec = dict((lease or {}).get("spec") or {})
        holder = spec.get("holderIdentity")
        if lease is not None:
            record = (holder, spec.get("renewTime"), lease["metadata"].get("resourceVersion"))
            if record != self._observed:
                self._observed, self._observed_at = record, self.clock()
            duration = spec.get("leaseDurationSeconds") or self.duration
            held_by_other = holder and holder != self.identity
            if held_by_other and self.clock() < self._observed_at + duration:
                return False
        now = datetime.now(timezone.utc)
        if holder != self.identity:
            spec["acquireTime"] = _stamp(now)
            spec["leaseTransitions"] = (spec.get("leaseTransitions") or 0) + (1 if lease else 0)
            log.info("leader election: %s takes the lease from %s", self.identity, holder)
        spec.update(
            holderIdentity=self.identity, leaseDurationSeconds=self.duration, renewTime=_stamp(now)
        )
        try:
            if lease is None:
                self.cluster.request(
                    "POST",
                    path("coordination.k8s.io/v1", "Lease", self.namespace),
                    self._body(spec, None),
                    timeout=self._timeout,
                )
            else:
                rv = lease["metadata"]["resourceVersion"]
                self.cluster.request("PUT", self.url, self._body(spec, rv), timeout=self._timeout)
        except ApiError as e:
            if e.status not in (409, 422):
                log.warning("leader election: %s", e)
            return False  # someone else wrote first: they lead this term
        return True

    def release(self) -> None:
        """Hand the Lease back on shutdown, so a standby takes over at once, not after expiry."""
        self._renewed_at = None
        try:
            lease = self.cluster.request("GET", self.url)
            spec = dict(lease.get("spec") or {})
            if spec.get("holderIdentity") != self.identity:
                return
            spec.update(holderIdentity=None, leaseDurationSeconds=1)
            self.cluster.request(
                "PUT", self.url, self._body(spec, lease["metadata"]["resourceVersion"])
            )
            log.info("leader election: %s released the lease", self.identity)
        except ApiError as e:
            log.warning("leader election: could not release the lease: %s", e)
