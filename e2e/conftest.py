"""Session fixtures: which cluster the e2e tests run against, API clients, throwaway namespaces.

- `KUBECONFIG` set by the user (and not our own `.e2e/kubeconfig`): that cluster is used as is;
  tests needing fake GPU/hugepage nodes or the audit log are skipped with a reason.
- a cluster from `make e2e-up` still running: reused, and left running.
- otherwise: the local control plane is started for the session and stopped after it.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e import cluster as local
from e2e.kube import Cluster, Kube, wait_for
from e2e.operator_proc import OperatorProcess, Release, install_chart, uninstall_chart

NEEDS_LOCAL = (
    "needs the local control plane (fake GPU/hugepage nodes, API audit log); "
    "KUBECONFIG points at an existing cluster"
)


def _is_ours(path: str) -> bool:
    return Path(path).resolve() == local.KUBECONFIG.resolve() and local.running() is not None


def _one_file(kubeconfig: str) -> Path:
    """A `KUBECONFIG` list (a:b) merged into one file: kubectl and helm get `--kubeconfig=`."""
    if os.pathsep not in kubeconfig:
        return Path(kubeconfig)
    merged = subprocess.run(
        [str(local.BIN / "kubectl"), "config", "view", "--raw", "--flatten"],
        env={**os.environ, "KUBECONFIG": kubeconfig},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = local.E2E_DIR / "external.kubeconfig"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(merged)
    path.chmod(0o600)
    return path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Real-node tests first: they run the operator as a pod of its own Helm release, which must
    be uninstalled before the session's local operator process starts (both watch every
    namespace). The sort is stable, so the order within each group stays."""
    items.sort(key=lambda item: item.get_closest_marker("real_node") is None)


@pytest.fixture(scope="session")
def kube() -> Iterator[Cluster]:
    user = os.environ.get("KUBECONFIG")
    if user and not _is_ours(user):
        yield Cluster(_one_file(user), local=False)
        return
    with local.session() as kubeconfig:
        yield Cluster(kubeconfig, local=True)


@pytest.fixture(scope="session")
def fake_nodes(kube: Cluster) -> list[local.NodeShape]:
    """The fake node shapes; skips the test on a user's cluster, which has its own nodes."""
    if not kube.local:
        pytest.skip(NEEDS_LOCAL)
    return local.NODE_SHAPES


@pytest.fixture(scope="session")
def k8s(kube: Cluster) -> Kube:
    return Kube(kube.kubeconfig)


@pytest.fixture
def namespace(k8s: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test (pods need its default ServiceAccount, so wait for that)."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_"))[:48]
    base = base.strip("-")
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    k8s.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    wait_for(
        f"ServiceAccount default in {name}",
        lambda: k8s.get("v1", "ServiceAccount", "default", name),
        timeout=30,
    )
    try:
        yield name
    finally:
        k8s.delete("v1", "Namespace", name)


@pytest.fixture(scope="session")
def release(kube: Cluster, k8s: Kube) -> Iterator[Release]:
    """`helm install` of the chart, as a user would run it."""
    rel = install_chart(kube, k8s)
    try:
        yield rel
    finally:
        uninstall_chart(kube, rel)


@pytest.fixture(scope="session")
def operator(kube: Cluster, release: Release) -> Iterator[OperatorProcess]:
    """The operator process, started from the release's pod spec and ServiceAccount."""
    proc = OperatorProcess(kube, release.namespace, release.deployment)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
