"""GitOps without perpetual diffs, against the real operator: a resource applied from Git stays
exactly as Git says after the operator has reconciled it, and what the operator creates is
server-side applied by one field manager.

Argo CD and Flux apply server-side and compare what they applied with what is live; any field
the operator wrote outside `/status` would show up as drift forever.
"""

from __future__ import annotations

import subprocess

import yaml

from e2e import lmcd
from e2e.cluster import BIN, NodeShape
from e2e.kube import Cluster, Kube, Obj
from e2e.operator_proc import OperatorProcess

GITOPS_MANAGER = "argocd-controller"  # the field manager Argo CD applies with
OPERATOR_MANAGER = "lmcache-operator"
NAME = "from-git"


def kubectl(kube: Cluster, *args: str, manifest: Obj) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "kubectl"), f"--kubeconfig={kube.kubeconfig}", *args, "-f", "-"]
    stdin = yaml.safe_dump(manifest)
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)


def test_a_resource_from_git_shows_no_diff_after_reconcile(
    kube: Cluster,
    k8s: Kube,
    operator: OperatorProcess,
    namespace: str,
    fake_nodes: list[NodeShape],
) -> None:
    cr = lmcd.manifest(NAME, lmcache={"maxLocalCpuSize": 2})
    cr["metadata"].update(labels={"team": "ml"}, annotations={"owner": "ml-platform"})
    apply = ["apply", "--server-side", f"--field-manager={GITOPS_MANAGER}", "-n", namespace]
    applied = kubectl(kube, *apply, manifest=cr)
    assert applied.returncode == 0, applied.stderr
    live = lmcd.wait_ready(k8s, NAME, namespace)

    meta = live["metadata"]
    assert not meta.get("finalizers"), "the operator must not add finalizers"
    assert meta.get("annotations") == {"owner": "ml-platform"}
    assert meta.get("labels") == {"team": "ml"}
    others = [m for m in meta["managedFields"] if m["manager"] != GITOPS_MANAGER]
    assert others, "the operator wrote no status"
    assert all(m.get("subresource") == "status" for m in others), others

    diff = kubectl(
        kube,
        "diff",
        "--server-side",
        f"--field-manager={GITOPS_MANAGER}",
        "-n",
        namespace,
        manifest=cr,
    )
    assert diff.returncode == 0, f"Git's manifest differs from the live object:\n{diff.stdout}"

    # Re-applying the unchanged manifest (Argo CD self-heal, a Flux interval) is a no-op.
    again = kubectl(kube, *apply, manifest=cr)
    assert again.returncode == 0, again.stderr
    after = lmcd.get(k8s, NAME, namespace)
    assert after is not None and after["metadata"]["generation"] == meta["generation"]


def test_operator_children_are_applied_by_one_field_manager(
    k8s: Kube, operator: OperatorProcess, namespace: str, fake_nodes: list[NodeShape]
) -> None:
    k8s.create(lmcd.manifest(NAME), namespace)
    cr = lmcd.wait_ready(k8s, NAME, namespace)
    selector = f"app.kubernetes.io/instance={NAME}"
    children = [
        obj
        for api_version, kind in [("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "Deployment")]
        for obj in k8s.items(api_version, kind, namespace, selector)
        if lmcd.owned_by(obj, cr)
    ]
    assert {o["kind"] for o in children} == {"ConfigMap", "Service", "Deployment"}
    for obj in children:
        appliers = {
            m["manager"] for m in obj["metadata"]["managedFields"] if m["operation"] == "Apply"
        }
        assert appliers == {OPERATOR_MANAGER}, (obj["kind"], obj["metadata"]["managedFields"])
