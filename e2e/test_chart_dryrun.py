"""Every object the chart renders, for every value set, accepted by the real API server.

`helm template` and the golden files prove what the chart writes; only the API server proves that
it is valid: schemas of each kind, the CRD's own schema and CEL rules on the sample
`LMCacheDeployment`, RBAC objects, the PodDisruptionBudget. A server-side dry-run persists
nothing, so this needs no operator. The kustomize manifests under deploy/ get the same check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from e2e.cluster import BIN, REPO
from e2e.kube import Cluster, Kube, Obj

CHART = REPO / "charts" / "lmcache-operator"
RELEASE = "lmcache-dryrun"
# Not the namespace the operator tests install into: nothing here may disturb them.
NAMESPACE = "lmcache-dryrun"
VALUE_SETS = sorted(
    p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml")
)
MONITORING_API = "monitoring.coreos.com/v1"
# The Prometheus Operator release whose own CRDs validate our ServiceMonitor and PodMonitor on the
# local cluster, fetched through the Go module proxy like the other e2e tools.
PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
MONITORING_CRDS = ("servicemonitors", "podmonitors")
FIELD_MANAGER = "lmcache-chart-dryrun"


def values_file(value_set: str) -> Path:
    return CHART / "ci" / f"{value_set}-values.yaml"


def render(kube: Cluster, values: Path, api_versions: list[str]) -> list[Obj]:
    args = ["template", RELEASE, str(CHART), "-n", NAMESPACE, "--values", str(values)]
    for api in api_versions:
        args += ["--api-versions", api]
    return [d for d in yaml.safe_load_all(kube.helm(*args)) if d]


def dry_run(kube: Cluster, objs: list[Obj]) -> subprocess.CompletedProcess[str]:
    """Server-side apply with dryRun=All: admission, validation and defaulting, nothing stored."""
    argv = [str(BIN / "kubectl"), f"--kubeconfig={kube.kubeconfig}", "apply", "--server-side"]
    argv += ["--dry-run=server", f"--field-manager={FIELD_MANAGER}", "-f", "-"]
    stdin = yaml.safe_dump_all(objs)
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)


def assert_accepted(kube: Cluster, objs: list[Obj], what: str) -> None:
    proc = dry_run(kube, objs)
    assert proc.returncode == 0, f"{what}: {proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if "(server dry run)" in line]
    assert len(lines) == len(objs), f"{what}: {len(objs)} objects, accepted: {lines}"


def served(kube: Cluster, api_version: str) -> bool:
    return api_version in kube.kubectl("api-versions").split()


@pytest.fixture(scope="module")
def namespaces(k8s: Kube) -> Iterator[list[str]]:
    """The release namespace and the watched ones of the value sets; removed if we made them."""
    wanted = {NAMESPACE}
    for value_set in VALUE_SETS:
        values = yaml.safe_load(values_file(value_set).read_text()) or {}
        wanted |= set(values.get("watchNamespaces") or [])
    created = []
    for name in sorted(wanted):
        if k8s.get("v1", "Namespace", name) is None:
            k8s.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
            created.append(name)
    try:
        yield sorted(wanted)
    finally:
        for name in created:
            k8s.delete("v1", "Namespace", name)


def install_crds(kube: Cluster, paths: list[Path]) -> None:
    for path in paths:
        kube.kubectl("apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", str(path))
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        kube.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")


@pytest.fixture(scope="module")
def crd(kube: Cluster) -> None:
    """The CRD for real: a custom resource can only be validated once its type is served."""
    install_crds(kube, sorted((CHART / "crds").glob("*.yaml")))


@pytest.fixture(scope="module")
def monitoring_api(kube: Cluster, tmp_path_factory: pytest.TempPathFactory) -> bool:
    """Whether monitoring.coreos.com/v1 is served: already, or on our local cluster from the
    pinned upstream CRDs (a user's cluster is left as it is)."""
    if served(kube, MONITORING_API):
        return True
    if not kube.local:
        return False
    go = shutil.which("go")
    if go is None:
        pytest.fail("go is needed to fetch the Prometheus Operator CRDs (as for `make e2e-tools`)")
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    cwd = tmp_path_factory.mktemp("gomod")
    argv = [go, "mod", "download", "-json", PROMETHEUS_OPERATOR]
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=True)
    crds = Path(json.loads(out.stdout)["Dir"]) / "example" / "prometheus-operator-crd"
    install_crds(kube, [crds / f"monitoring.coreos.com_{name}.yaml" for name in MONITORING_CRDS])
    return True


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_chart_objects_pass_server_side_dry_run(
    kube: Cluster, namespaces: list[str], crd: None, monitoring_api: bool, value_set: str
) -> None:
    # Prometheus Operator objects are rendered only where their API is served; on a user's
    # cluster without it they are absent here too, as they would be from a real install.
    objs = render(kube, values_file(value_set), [MONITORING_API] if monitoring_api else [])
    assert objs, f"{value_set}: nothing rendered"
    if value_set == "monitoring" and monitoring_api:
        assert {"ServiceMonitor", "PodMonitor"} <= {o["kind"] for o in objs}
    assert_accepted(kube, objs, value_set)


def moved(objs: list[Obj], namespace: str) -> list[Obj]:
    """The objects of the overlay's own Namespace (the operator's) moved into `namespace`; the
    rest stay (the watched namespaces of the namespaced overlay exist: the fixture made them).

    A dry-run creates no Namespace, so the overlays' own (lmcache-system) would not exist for the
    objects inside it; the operator tests own that namespace, so it is not created here.
    """
    (own,) = {o["metadata"]["namespace"] for o in objs if o["kind"] == "Deployment"}
    out = []
    for obj in objs:
        meta = dict(obj["metadata"])
        if obj["kind"] == "Namespace":
            meta["name"] = namespace
        elif meta.get("namespace") == own:
            meta["namespace"] = namespace
        out.append({**obj, "metadata": meta})
    return out


@pytest.mark.parametrize("overlay", ["cluster-wide", "namespaced"])
def test_deploy_overlays_pass_server_side_dry_run(
    kube: Cluster, namespaces: list[str], crd: None, overlay: str
) -> None:
    built = kube.kubectl("kustomize", str(REPO / "deploy" / "overlays" / overlay))
    objs = [d for d in yaml.safe_load_all(built) if d]
    assert any(o["kind"] == "Deployment" for o in objs)
    assert_accepted(kube, moved(objs, NAMESPACE), overlay)


def test_a_bad_sample_spec_is_refused_by_the_crd(
    kube: Cluster, namespaces: list[str], crd: None, tmp_path: Path
) -> None:
    """The dry-run is not a rubber stamp: the CRD's schema refuses a sample without a model."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"sample": {"enabled": True, "spec": {"model": ""}}}))
    (sample,) = [o for o in render(kube, values, []) if o["kind"] == "LMCacheDeployment"]
    proc = dry_run(kube, [sample])
    assert proc.returncode != 0, "an empty model was accepted"
    assert "spec.model" in proc.stderr, proc.stderr


def test_install_notes_give_the_next_step_and_say_what_was_skipped(
    kube: Cluster, namespaces: list[str]
) -> None:
    args = ["install", "notes", str(CHART), "-n", NAMESPACE, "--dry-run=client"]
    out = kube.helm(*args, "--values", str(values_file("monitoring")))
    notes = out[out.index("NOTES:") :]
    assert f"kubectl -n {NAMESPACE} rollout status deployment/notes-lmcache-operator" in notes
    assert "kind: LMCacheDeployment" in notes
    skipped = "so no ServiceMonitor was created" in notes
    assert skipped != served(kube, MONITORING_API)
