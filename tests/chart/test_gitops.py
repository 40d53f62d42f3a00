"""The GitOps examples point at what this repo really ships, with values the chart accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import chartctl
import pytest
import yaml

GITOPS = chartctl.REPO / "examples" / "gitops"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((GITOPS / name).read_text()) if d]


def render_with(values: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    """Values the example passes to the chart, through the real helm and the values schema."""
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    args = ["template", "x", chartctl.CHART, "--kube-version", chartctl.kube_version()]
    return chartctl.objects(chartctl.helm(*args, "--values", str(path)))


def test_argocd_application_installs_the_chart_server_side(helm: Path, tmp_path: Path) -> None:
    (app,) = docs("argocd-application.yaml")
    assert app["kind"] == "Application"
    source = app["spec"]["source"]
    assert chartctl.REPO / source["path"] == chartctl.CHART
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    objs = render_with(source["helm"]["valuesObject"], tmp_path)
    (deployment,) = [o for o in objs if o["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == source["helm"]["valuesObject"]["replicaCount"]


@pytest.mark.parametrize("overlay", ["cluster-wide", "namespaced"])
def test_the_kustomize_alternative_exists(overlay: str) -> None:
    assert (chartctl.DEPLOY / "overlays" / overlay / "kustomization.yaml").is_file()


def test_flux_helmrelease_updates_crds(helm: Path, tmp_path: Path) -> None:
    source, release = docs("flux-helmrelease.yaml")
    assert source["kind"] == "GitRepository"
    spec = release["spec"]
    assert chartctl.REPO / spec["chart"]["spec"]["chart"] == chartctl.CHART
    assert spec["install"]["crds"] == spec["upgrade"]["crds"] == "CreateReplace"
    render_with(spec["values"], tmp_path)


@pytest.mark.parametrize("overlay", sorted(chartctl.OVERLAYS))
def test_each_overlay_creates_every_namespace_it_uses(helm: Path, overlay: str) -> None:
    """`kubectl apply -k` on a fresh cluster: a Role in a namespace nobody created fails."""
    files = chartctl.deploy_files()
    objs = [
        o
        for rel in ("base/install.yaml", f"overlays/{overlay}/install.yaml")
        for o in yaml.safe_load_all(files[rel])
        if o
    ]
    created = {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"}
    used = {o["metadata"]["namespace"] for o in objs if o["metadata"].get("namespace")}
    assert used <= created, f"{overlay} puts objects in namespaces it does not create"
