"""What a shared GPU cluster decides, on the real API server: Pod Security admission, RBAC, the
Valkey password's Secret under deletion and rotation, and the KV-events wiring.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml

from e2e import lmcd
from e2e.cluster import BIN, NodeShape
from e2e.kube import Cluster, Kube, Obj, audit_events, condition, is_true, wait_for
from e2e.operator_proc import OperatorProcess, Release

RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
    "pod-security.kubernetes.io/warn": "restricted",
    "pod-security.kubernetes.io/warn-version": "latest",
}
SECRET_HASH = "serving.lmcache-kube.io/secret-hash"


def label_namespace(kube: Cluster, namespace: str, labels: dict[str, str]) -> None:
    kube.kubectl(
        "label", "namespace", namespace, "--overwrite", *(f"{k}={v}" for k, v in labels.items())
    )


def pods(k8s: Kube, namespace: str, name: str, component: str) -> list[Obj]:
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/component={component}"
    return k8s.items("v1", "Pod", namespace, selector)


def failed_creates(k8s: Kube, namespace: str) -> list[str]:
    """Pod creations the API server refused, as the ReplicaSet/StatefulSet controllers report."""
    events = k8s.items("v1", "Event", namespace)
    return [e["message"] for e in events if e.get("reason") == "FailedCreate"]


def server_dry_run(kube: Cluster, obj: Obj) -> subprocess.CompletedProcess[str]:
    """Re-submit a live workload as the operator would: PodSecurity `warn` evaluates its pod
    template and answers with warnings, even where `enforce` only judges pods."""
    clean = {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "metadata": {"name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"]},
        "spec": obj["spec"],
    }
    argv = [str(BIN / "kubectl"), f"--kubeconfig={kube.kubeconfig}", "apply", "--server-side"]
    argv += ["--dry-run=server", "--force-conflicts", "--field-manager=pss-check", "-f", "-"]
    return subprocess.run(argv, input=yaml.safe_dump(clean), capture_output=True, text=True)


# --- Pod Security -------------------------------------------------------------------------------


def test_pods_are_admitted_in_a_restricted_namespace(
    kube: Cluster, k8s: Kube, operator: OperatorProcess, namespace: str, fake_nodes: list[NodeShape]
) -> None:
    label_namespace(kube, namespace, RESTRICTED)
    spec: dict[str, Any] = {
        "lmcache": {"hugepages": {"enabled": True}, "maxLocalCpuSize": 1},
        "valkey": {"enabled": True},
        "kvEvents": {"enabled": True},
    }
    k8s.create(lmcd.manifest("secure", **spec), namespace)
    lmcd.wait_ready(k8s, "secure", namespace)
    vllm_pods, valkey_pods = (
        pods(k8s, namespace, "secure", "vllm"),
        pods(k8s, namespace, "secure", "valkey"),
    )
    assert vllm_pods and valkey_pods, "no pods were admitted"
    assert failed_creates(k8s, namespace) == []
    for kind, name in (("Deployment", "secure"), ("StatefulSet", "secure-valkey")):
        live = k8s.get("apps/v1", kind, name, namespace)
        assert live is not None
        checked = server_dry_run(kube, live)
        assert checked.returncode == 0, checked.stderr
        assert "PodSecurity" not in checked.stderr, checked.stderr


def test_a_pod_the_profile_forbids_is_refused_and_reported(
    kube: Cluster, k8s: Kube, operator: OperatorProcess, namespace: str, fake_nodes: list[NodeShape]
) -> None:
    """The control: enforcement is real here, so the test above could fail. A hostPath volume
    (passed through spec.volumes) is not allowed by `restricted`."""
    label_namespace(kube, namespace, RESTRICTED)
    spec = {
        "volumes": [{"name": "host", "hostPath": {"path": "/srv/models"}}],
        "volumeMounts": [{"name": "host", "mountPath": "/models"}],
    }
    k8s.create(lmcd.manifest("insecure", **spec), namespace)

    def refused() -> list[str]:
        return [m for m in failed_creates(k8s, namespace) if "violates PodSecurity" in m]

    messages = wait_for("FailedCreate for PodSecurity", refused, timeout=60)
    assert "hostPath" in messages[0]
    assert pods(k8s, namespace, "insecure", "vllm") == []
    degraded = wait_for(
        "Degraded=ReplicaFailure",
        lambda: (
            (c := condition(lmcd.get(k8s, "insecure", namespace), "Degraded"))
            and c["status"] == "True"
            and c
        ),
        timeout=60,
    )
    assert degraded["reason"] == "ReplicaFailure"


# --- RBAC ---------------------------------------------------------------------------------------


def can_i(kube: Cluster, who: str, verb: str, resource: str, namespace: str) -> bool:
    """`resource` or `resource/subresource` (kubectl reads `a/b` as resource a, name b)."""
    resource, _, sub = resource.partition("/")
    args = ["auth", "can-i", verb, resource, f"--as={who}", "-n", namespace]
    out = kube.kubectl(*args, *([f"--subresource={sub}"] if sub else []), check=False)
    return out.strip() == "yes"


def test_operator_cannot_read_secrets_in_bulk(
    kube: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    who = operator.username
    for verb in ("list", "watch", "patch", "update"):
        assert not can_i(kube, who, verb, "secrets", namespace), verb
    for verb in ("get", "create", "delete"):
        assert can_i(kube, who, verb, "secrets", namespace), verb
    if kube.audit_log is not None:
        bulk = [
            e
            for e in audit_events(kube.audit_log, who)
            if e["objectRef"].get("resource") == "secrets" and e["verb"] in ("list", "watch")
        ]
        assert bulk == [], "the operator listed or watched Secrets"


def test_tenants_with_the_default_roles_manage_lmcachedeployments(
    kube: Cluster, k8s: Kube, release: Release, namespace: str
) -> None:
    """The chart aggregates into view/edit/admin: a namespace user needs no custom role."""
    for role, user in (("view", "viewer"), ("edit", "editor")):
        k8s.create(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": f"{user}-{role}"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": role,
                },
                "subjects": [
                    {"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}
                ],
            },
            namespace,
        )

    def aggregated() -> bool:
        return can_i(kube, "editor", "create", "lmcachedeployments", namespace)

    wait_for("edit aggregates LMCacheDeployments", aggregated, timeout=30)
    assert can_i(kube, "viewer", "list", "lmcachedeployments", namespace)
    assert not can_i(kube, "viewer", "create", "lmcachedeployments", namespace)
    assert can_i(kube, "editor", "patch", "lmcachedeployments/scale", namespace)
    assert not can_i(kube, "editor", "patch", "lmcachedeployments/status", namespace)


# --- the Valkey password's Secret -----------------------------------------------------------------


def template_annotation(k8s: Kube, kind: str, name: str, namespace: str) -> str | None:
    obj = k8s.get("apps/v1", kind, name, namespace)
    return (
        (obj or {}).get("spec", {}).get("template", {}).get("metadata", {}).get("annotations") or {}
    ).get(SECRET_HASH)


def test_deleted_generated_password_is_not_regenerated_under_running_valkey(
    k8s: Kube, operator: OperatorProcess, namespace: str, fake_nodes: list[NodeShape]
) -> None:
    k8s.create(lmcd.manifest("kv", valkey={"enabled": True}), namespace)
    lmcd.wait_ready(k8s, "kv", namespace)
    secret = k8s.get("v1", "Secret", "kv-valkey-auth", namespace)
    assert secret is not None
    before = template_annotation(k8s, "StatefulSet", "kv-valkey", namespace)
    assert before and before == template_annotation(k8s, "Deployment", "kv", namespace)

    k8s.delete("v1", "Secret", "kv-valkey-auth", namespace)

    def degraded() -> Obj | None:
        c = condition(lmcd.get(k8s, "kv", namespace), "Degraded")
        return c if c and c["reason"] == "SecretMissing" else None

    found = wait_for("Degraded=SecretMissing", degraded, timeout=90)
    assert "kv-valkey-auth" in found["message"]
    assert k8s.get("v1", "Secret", "kv-valkey-auth", namespace) is None, "a new password was made"
    assert template_annotation(k8s, "StatefulSet", "kv-valkey", namespace) == before


def test_rotating_an_existing_secret_rolls_vllm_and_valkey(
    kube: Cluster, k8s: Kube, operator: OperatorProcess, namespace: str, fake_nodes: list[NodeShape]
) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pw"}}
    k8s.create({**secret, "stringData": {"password": "first"}}, namespace)
    spec = {"valkey": {"enabled": True, "auth": {"existingSecret": "pw"}}}
    k8s.create(lmcd.manifest("rot", **spec), namespace)
    lmcd.wait_ready(k8s, "rot", namespace)
    first = {
        k: template_annotation(k8s, k, n, namespace)
        for k, n in (("Deployment", "rot"), ("StatefulSet", "rot-valkey"))
    }
    assert all(first.values())

    kube.kubectl(
        "patch",
        "secret",
        "pw",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"stringData":{"password":"second"}}',
    )

    def rolled() -> dict[str, str | None] | None:
        now = {
            k: template_annotation(k8s, k, n, namespace)
            for k, n in (("Deployment", "rot"), ("StatefulSet", "rot-valkey"))
        }
        return now if all(now[k] != first[k] for k in now) else None

    now = wait_for("both pod templates follow the new password", rolled, timeout=120)
    assert now["Deployment"] == now["StatefulSet"]
    lmcd.wait_ready(k8s, "rot", namespace, timeout=120)


# --- the engine's keys in extraConfig ------------------------------------------------------------


def kubectl_apply(
    kube: Cluster, namespace: str, obj: Obj, *flags: str
) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "kubectl"), f"--kubeconfig={kube.kubeconfig}", "apply", "-n", namespace]
    argv += [*flags, "-f", "-"]
    return subprocess.run(argv, input=yaml.safe_dump(obj), capture_output=True, text=True)


@pytest.mark.parametrize(
    ("extra", "refusal"),
    [
        # kubectl apply's strict decoding, or server-side apply's typed patch, name the key:
        ({"chunk_sise": 128}, r"(unknown field \"|\.)spec\.lmcache\.extraConfig\.chunk_sise"),
        (
            {"remote_timeout_ms": 0},
            r"remote_timeout_ms in body should be greater than or equal to 1",
        ),
        (
            {"save_unfull_chunk": "yes"},
            r"extraConfig\.save_unfull_chunk(: expected| in body must be of type) boolean",
        ),
        (
            {"remote_serde": "pickle"},
            r'extraConfig\.remote_serde: Unsupported value: "pickle": supported values: "naive"',
        ),
    ],
)
def test_extra_config_is_checked_against_the_engines_keys(
    kube: Cluster, k8s: Kube, release: Release, namespace: str, extra: dict[str, Any], refusal: str
) -> None:
    """A typo or an out-of-range value is refused by the API server, naming the key, both by
    `kubectl apply` and by a server-side apply (what Argo CD and Flux use)."""
    cr = lmcd.manifest("typo", lmcache={"extraConfig": extra})
    for flags in ((), ("--server-side",)):
        applied = kubectl_apply(kube, namespace, cr, *flags)
        assert applied.returncode != 0, f"accepted with {flags}: {applied.stdout}"
        assert re.search(refusal, applied.stderr), applied.stderr
    assert lmcd.get(k8s, "typo", namespace) is None


# --- KV events ----------------------------------------------------------------------------------


def test_kv_events_endpoints_list_every_ready_pod(
    k8s: Kube, operator: OperatorProcess, namespace: str, fake_nodes: list[NodeShape]
) -> None:
    """What a KV-aware router discovers: one publisher address per ready pod."""
    k8s.create(
        lmcd.manifest("routed", replicas=2, kvEvents={"enabled": True, "port": 5557}), namespace
    )
    lmcd.wait_ready(k8s, "routed", namespace)
    service = k8s.get("v1", "Service", "routed-kv-events", namespace)
    assert service and service["spec"]["clusterIP"] == "None"

    def endpoints() -> set[tuple[str, int]] | None:
        slices = k8s.items(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            namespace,
            "kubernetes.io/service-name=routed-kv-events",
        )
        found = {
            (address, port["port"])
            for s in slices
            for e in s.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready")
            for address in e["addresses"]
            for port in s.get("ports") or []
        }
        return found if len(found) == 2 else None

    found = wait_for("two ready KV-event endpoints", endpoints, timeout=60)
    pod_ips = {
        p["status"]["podIP"] for p in pods(k8s, namespace, "routed", "vllm") if is_true(p, "Ready")
    }
    assert {a for a, _ in found} == pod_ips
    assert {p for _, p in found} == {5557}
