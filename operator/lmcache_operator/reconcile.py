"""One reconcile of one `LMCacheDeployment`: validate, render, apply what differs, prune,
publish status. Level-triggered and idempotent: it reads the world, not the event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from lmcache_operator import api, capacity, diff, metrics, status
from lmcache_operator import spec as spec_mod
from lmcache_operator.kube import CHILD_KINDS, ApiError, Body, Cluster, key_of, now_rfc3339
from lmcache_operator.render import bundle, valkey
from lmcache_operator.render.common import VLLM, Owner, selector, stable_hash

log = logging.getLogger(__name__)


class ReconcileError(Exception):
    """The reconcile could not finish (the API server refused a write); retry later."""


class OwnershipConflict(Exception):
    """A child's name is taken by an object this deployment does not control."""


class SecretMissing(Exception):
    """The Secret with the remote tier's password is missing, and must not be made up."""


def label_selector(owner: Owner) -> str:
    """The string form the scale subresource (and an HPA) reads from status.selector."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector(owner, VLLM).items()))


class Reconciler:
    def __init__(self, cluster: Cluster, now: Callable[[], str] = now_rfc3339) -> None:
        self.cluster = cluster
        self.now = now

    def reconcile(self, namespace: str, name: str) -> bool:
        """Returns False when the object is gone (nothing to resync)."""
        body = self.cluster.get(api.API_VERSION, api.KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return False  # gone or going: garbage collection removes the children
        owner = Owner.of(body)
        raw = body.get("spec") or {}
        try:
            spec = spec_mod.parse(raw)
            errors = spec_mod.problems(spec)
        except spec_mod.SpecError as e:
            errors = [str(e)]
        if errors:
            # Nothing is applied from an invalid spec: no half-applied children.
            self._publish(
                body,
                status.Observed(
                    generation=body["metadata"].get("generation", 0),
                    replicas=raw["replicas"] if isinstance(raw.get("replicas"), int) else 1,
                    config_error="; ".join(errors),
                    deployment=self._get("apps/v1", "Deployment", owner, owner.name),
                    selector=label_selector(owner),
                ),
            )
            metrics.INVALID.inc()
            return True
        blocked = None
        rendered: bundle.Bundle | None = None
        try:
            rendered = bundle.render(spec, owner, self._secret_hash(spec, owner))
            self._apply(body, spec, owner, rendered)
        except ApiError as e:
            if e.namespace_terminating:
                return False  # the namespace is going; its deletion removes this object too
            blocked = ("ApplyFailed", str(e))
        except OwnershipConflict as e:
            blocked = ("ApplyFailed", str(e))
        except SecretMissing as e:
            blocked = ("SecretMissing", str(e))
        verdict = self._capacity(spec)
        self._publish(
            body,
            status.Observed(
                generation=body["metadata"].get("generation", 0),
                replicas=spec.replicas,
                blocked=blocked,
                engine_image=spec.image.ref,
                deployment=self._get("apps/v1", "Deployment", owner, owner.name),
                valkey_enabled=spec.valkey.enabled,
                valkey=self._get("apps/v1", "StatefulSet", owner, owner.child("valkey"))
                if spec.valkey.enabled
                else None,
                remote_url=spec.remote.url,
                capacity=verdict,
                sizing=status.sizing(spec, verdict),
                config_hash=rendered.config_hash if rendered else None,
                valkey_endpoint=bundle.valkey_endpoint(spec, owner),
                selector=label_selector(owner),
            ),
        )
        if blocked:
            raise ReconcileError(blocked[1])
        return True

    def _get(self, api_version: str, kind: str, owner: Owner, name: str) -> Body | None:
        return self.cluster.get(api_version, kind, owner.namespace, name)

    def _secret_hash(self, spec: spec_mod.Spec, owner: Owner) -> str | None:
        """The identity and version (uid, resourceVersion) of the Secret the pods read the
        remote tier's password from at start, so that a new password rolls them.

        The generated password is created once (a 409 means it exists) and never read back:
        only metadata is fetched. If it disappears while the Valkey StatefulSet exists, a new
        one would split the running server's password from its clients', so nothing is
        regenerated and nothing is applied until a human decides (`SecretMissing`).
        """
        creds = valkey.credentials(spec, owner)
        if creds is None:
            return None
        name = creds.secret
        meta = self.cluster.secret_metadata(owner.namespace, name)
        if meta is None and valkey.generated_secret_needed(spec):
            server = self._get("apps/v1", "StatefulSet", owner, owner.child("valkey"))
            if server is not None:
                raise SecretMissing(
                    f"Secret {name} (the generated Valkey password) was deleted while "
                    f"StatefulSet {server['metadata']['name']} still runs with it; recreate "
                    "it with the old password, or delete that StatefulSet to start over "
                    "with a new one (its cache is lost)"
                )
            secret = valkey.password_secret(spec, owner, valkey.new_password())
            meta = self.cluster.create(secret) or self.cluster.secret_metadata(
                owner.namespace, name
            )
        if meta is None:
            raise SecretMissing(
                f"Secret {name} ({creds.field}) not found; create it, or fix the name"
            )
        return stable_hash([meta["metadata"]["uid"], meta["metadata"]["resourceVersion"]])

    def _apply(
        self, body: Body, spec: spec_mod.Spec, owner: Owner, rendered: bundle.Bundle
    ) -> None:
        changed: list[str] = []
        wanted = set()
        # The live server reads the generated password: it exists, and goes when unneeded.
        # Looked up among the cached children, not with a GET: most deployments have no Valkey.
        server_key = ("apps/v1", "StatefulSet", owner.namespace, owner.child("valkey"))
        generated = any(
            key_of(c) == server_key and valkey.secret_name(owner) in valkey.secret_refs(c)
            for c in self.cluster.owned(owner.uid)
        )
        try:
            for manifest in rendered.manifests:
                desired = diff.with_applied_hash(manifest)
                wanted.add(key_of(desired))
                kind, name = desired["kind"], desired["metadata"]["name"]
                live = self._get(desired["apiVersion"], kind, owner, name)
                if live is not None and not _controlled_by(live, owner.uid):
                    raise OwnershipConflict(
                        f"{kind}/{name} exists and is not controlled by this {api.KIND}; "
                        "rename or delete it (the operator never adopts objects)"
                    )
                if diff.up_to_date(live, desired):
                    continue
                self._write(desired, live)
                metrics.APPLIES.labels(kind=kind).inc()
                changed.append(f"{kind}/{name}")
            # Children we made for an earlier spec (say, Valkey since disabled) go away now.
            # The generated password's Secret is not watched: it goes with the last server
            # that read it.
            for child in self.cluster.owned(owner.uid):
                key = key_of(child)
                if (
                    key[:2] in CHILD_KINDS
                    and key not in wanted
                    and _controlled_by(child, owner.uid)
                ):
                    self.cluster.delete(*key)
                    changed.append(f"deleted {key[1]}/{key[3]}")
            if generated and not valkey.generated_secret_needed(spec):
                self.cluster.delete("v1", "Secret", owner.namespace, valkey.secret_name(owner))
                changed.append(f"deleted Secret/{valkey.secret_name(owner)}")
        finally:
            if changed:
                log.info("%s/%s: %s", owner.namespace, owner.name, ", ".join(changed))
                self.cluster.event(body, "Normal", "Applied", "; ".join(changed))

    def _write(self, desired: Body, live: Body | None) -> None:
        """Apply; a StatefulSet refused for an immutable field (volumeClaimTemplates) is
        replaced: it only holds the Valkey cache, and a new size or class needs new volumes."""
        try:
            self.cluster.apply(desired)
        except ApiError as e:
            immutable = e.status == 422 and "updates to statefulset spec" in e.detail
            if not immutable or desired["kind"] != "StatefulSet" or live is None:
                raise
            log.info("replacing %s: %s", desired["metadata"]["name"], e)
            self.cluster.delete(*key_of(desired))
            self.cluster.apply(desired)

    def _capacity(self, spec: spec_mod.Spec) -> capacity.Verdict | None:
        nodes = self.cluster.nodes()
        return None if nodes is None else capacity.check(spec, nodes)

    def _publish(self, body: Body, observed: status.Observed) -> None:
        previous: Mapping[str, Any] = body.get("status") or {}
        new = status.build(previous, observed, self.now())
        if not status.changed(previous, new):
            return
        meta = body["metadata"]
        self.cluster.patch_status(meta["namespace"], meta["name"], new)
        metrics.STATUS_PATCHES.inc()
        for t in status.transitions(previous, new):
            self.cluster.event(body, t.type, t.reason, t.message)


def _controlled_by(child: Mapping[str, Any], uid: str) -> bool:
    refs = child["metadata"].get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)
