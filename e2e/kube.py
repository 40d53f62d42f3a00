"""What the e2e tests share: the cluster under test, a dict-based API client, waits, audit reads.

Objects are plain dicts (as `kubectl get -o json` shows them) through the dynamic client, so the
same calls work for Pods, Deployments and our own custom resources.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import config, dynamic
from kubernetes.client.exceptions import ApiException

from e2e.cluster import BIN, STATE

T = TypeVar("T")
Obj = dict[str, Any]
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
FIELD_MANAGER = "lmcache-e2e"


class CommandError(RuntimeError):
    """A CLI call failed; carries its stderr so the assertion message says why."""


@dataclass(frozen=True)
class Cluster:
    """The cluster a test session runs against.

    `local` is our own control plane: fake GPU/hugepage nodes and an API audit log exist. On a
    user's cluster (`KUBECONFIG=… make e2e`) tests that need them are skipped with a reason.
    """

    kubeconfig: Path
    local: bool

    @property
    def audit_log(self) -> Path | None:
        return STATE / "audit.log" if self.local else None

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return cli("kubectl", self.kubeconfig, *args, input=input, check=check)

    def helm(self, *args: str, check: bool = True) -> str:
        return cli("helm", self.kubeconfig, *args, check=check)


def cli(
    name: str, kubeconfig: Path, *args: str, input: str | None = None, check: bool = True
) -> str:
    """Run `.e2e/bin/<name>` (kubectl, helm) against `kubeconfig`."""
    out = subprocess.run(
        [str(BIN / name), f"--kubeconfig={kubeconfig}", *args],
        capture_output=True,
        text=True,
        input=input,
        check=False,
    )
    if check and out.returncode != 0:
        raise CommandError(f"{name} {' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout


class Kube:
    """Dict-in, dict-out access to any resource kind, through the official dynamic client."""

    def __init__(self, kubeconfig: Path) -> None:
        self.client = dynamic.DynamicClient(config.new_client_from_config(str(kubeconfig)))
        # The dynamic client's discovery cache is not thread-safe: a miss (a CRD installed a
        # moment ago) rebuilds it, and a concurrent lookup then sees it half-built.
        self._discovery = threading.Lock()

    def _res(self, api_version: str, kind: str) -> Any:
        with self._discovery:
            return self.client.resources.get(api_version=api_version, kind=kind)

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> Obj | None:
        try:
            obj = self._res(api_version, kind).get(name=name, namespace=namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return dict(obj.to_dict())

    def items(
        self, api_version: str, kind: str, namespace: str | None = None, selector: str | None = None
    ) -> list[Obj]:
        out = self._res(api_version, kind).get(namespace=namespace, label_selector=selector)
        return [dict(item) for item in out.to_dict()["items"]]

    def create(self, manifest: Obj, namespace: str | None = None) -> Obj:
        res = self._res(manifest["apiVersion"], manifest["kind"])
        return dict(res.create(body=manifest, namespace=namespace).to_dict())

    def apply(self, manifest: Obj, namespace: str | None = None) -> Obj:
        """Server-side apply, as a user's `kubectl apply --server-side` would."""
        res = self._res(manifest["apiVersion"], manifest["kind"])
        out = res.server_side_apply(
            body=manifest,
            name=manifest["metadata"]["name"],
            namespace=namespace,
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        )
        return dict(out.to_dict())

    def delete(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None = None,
        propagation: str = "Background",
    ) -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        self._res(api_version, kind).delete(name=name, namespace=namespace, body=body)

    def events(self, namespace: str, kind: str, name: str) -> list[Obj]:
        """Events about `kind/name`, oldest first."""
        selector = f"involvedObject.kind={kind},involvedObject.name={name}"
        res = self._res("v1", "Event")
        items = res.get(namespace=namespace, field_selector=selector).to_dict()["items"]
        return sorted(items, key=lambda e: e["metadata"]["creationTimestamp"])


def condition(obj: Obj | None, type_: str) -> Obj | None:
    """The status condition of `type_`, or None."""
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return None


def is_true(obj: Obj | None, type_: str) -> bool:
    c = condition(obj, type_)
    return c is not None and c.get("status") == "True"


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.25
) -> T:
    """Poll `probe` every `interval` seconds until it returns something truthy and return it;
    fail at the deadline.

    The last value seen goes into the failure message so a timeout says where things got stuck.
    """
    deadline = time.monotonic() + timeout
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}"
            )
        time.sleep(interval)


def audit_events(log: Path, user: str | None = None) -> list[Obj]:
    """The API server's audit events (JSON lines), optionally only those of one user.

    Every event gets an `objectRef` (empty for non-resource URLs such as /api or /healthz) so
    callers can filter on it without special cases.
    """
    if not log.exists():
        return []
    events = []
    for line in log.read_text().splitlines():
        event = json.loads(line)
        event.setdefault("objectRef", {})
        if user is None or event.get("user", {}).get("username") == user:
            events.append(event)
    return events
