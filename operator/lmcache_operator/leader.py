"""Leader election on a `coordination.k8s.io` Lease, as Kubernetes' own controllers do.

Every replica watches and caches; only the holder of the Lease reconciles. A replica that
stops renewing loses the Lease after `duration` seconds and a standby takes over. Writes
carry the Lease's resourceVersion, so two replicas can never both win the same term.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from lmcache_operator.kube import ApiError, KubeCluster, path

log = logging.getLogger(__name__)


def _stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass
class LeaseElector:
    cluster: KubeCluster
    namespace: str
    name: str
    identity: str
    duration: int = 15

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

    def try_acquire(self, now: datetime | None = None) -> bool:
        """One round: create, renew or take over the Lease. True while we hold it."""
        now = now or datetime.now(timezone.utc)
        try:
            lease = self.cluster.request("GET", self.url)
        except ApiError as e:
            if e.status != 404:
                log.warning("leader election: %s", e)
                return False
            lease = None
        spec = dict((lease or {}).get("spec") or {})
        holder = spec.get("holderIdentity")
        renewed = _parse(spec.get("renewTime"))
        expired = renewed is None or now > renewed + timedelta(
            seconds=spec.get("leaseDurationSeconds") or self.duration
        )
        if lease and holder and holder != self.identity and not expired:
            return False
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
                )
            else:
                rv = lease["metadata"]["resourceVersion"]
                self.cluster.request("PUT", self.url, self._body(spec, rv))
        except ApiError as e:
            if e.status not in (409, 422):
                log.warning("leader election: %s", e)
            return False  # someone else wrote first: they lead this term
        return True

    def release(self) -> None:
        """Hand the Lease back on shutdown, so a standby takes over at once, not after expiry."""
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
