"""The whole stack: the chart installed by Helm, the operator reconciling against a real API server,
the real scheduler placing GPU/hugepage pods, the real controller-manager rolling out and
garbage-collecting. Numbers follow the issue's list of end-to-end tests.
"""

from __future__ import annotations

import functools
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from e2e import lmcd
from e2e.cluster import REPO, NodeShape
from e2e.kube import WRITE_VERBS, Cluster, Kube, Obj, audit_events, condition, is_true, wait_for
from e2e.operator_proc import OperatorProcess, Release
from tests.operator.invalid_specs import INVALID


def lmcd_docs(path: Path) -> list[Obj]:
    """The LMCacheDeployments in a YAML file (examples/ also holds engine configs, GitOps apps)."""
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError:
        return []
    return [d for d in docs if isinstance(d, dict) and d.get("kind") == lmcd.KIND]


EXAMPLES = [p for p in sorted((REPO / "examples").rglob("*.yaml")) if lmcd_docs(p)]
VALKEY_KINDS = [
    ("apps/v1", "StatefulSet"),
    ("v1", "Service"),
    ("v1", "Secret"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
]


def children(k8s: Kube, cr: Obj, api_version: str, kind: str, component: str) -> list[Obj]:
    selector = f"app.kubernetes.io/instance={cr['metadata']['name']},"
    selector += f"app.kubernetes.io/component={component}"
    found = k8s.items(api_version, kind, cr["metadata"]["namespace"], selector)
    return [o for o in found if lmcd.owned_by(o, cr)]


def pods_of(k8s: Kube, name: str, namespace: str) -> list[Obj]:
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/component=vllm"
    return [
        p
        for p in k8s.items("v1", "Pod", namespace, selector)
        if not p["metadata"].get("deletionTimestamp")
    ]


def vllm_container(pod_spec: Obj) -> Obj:
    return dict(next(c for c in pod_spec["containers"] if c["name"] == "vllm"))


def hugepage_mounts(pod_spec: Obj) -> list[str]:
    """Mount paths of emptyDir volumes backed by 2 MiB hugepages in the vLLM container."""
    volumes = {
        v["name"]
        for v in pod_spec.get("volumes") or []
        if (v.get("emptyDir") or {}).get("medium") in ("HugePages", "HugePages-2Mi")
    }
    return [
        m["mountPath"]
        for m in vllm_container(pod_spec).get("volumeMounts") or []
        if m["name"] in volumes
    ]


# --- 1. helm install ----------------------------------------------------------------------------


def test_helm_install_establishes_crd_and_operator_objects(
    kube: Cluster, k8s: Kube, release: Release, operator: OperatorProcess, namespace: str
) -> None:
    crd = k8s.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", lmcd.CRD_NAME)
    assert crd and is_true(crd, "Established"), "CRD not established"
    status = yaml.safe_load(
        kube.helm("status", release.name, "-n", release.namespace, "-o", "yaml")
    )
    assert status["info"]["status"] == "deployed"
    deployment = k8s.get("apps/v1", "Deployment", release.deployment, release.namespace)
    assert deployment is not None
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert k8s.get("v1", "ServiceAccount", account, release.namespace), "ServiceAccount missing"
    bindings = k8s.items("rbac.authorization.k8s.io/v1", "ClusterRoleBinding")
    bindings += k8s.items("rbac.authorization.k8s.io/v1", "RoleBinding", release.namespace)
    assert any(
        s.get("name") == account and s.get("namespace") == release.namespace
        for b in bindings
        for s in b.get("subjects") or []
    ), "no binding grants the operator's ServiceAccount its role"

    # The process runs as that ServiceAccount and reconciles: a CR gets a status for its generation.
    k8s.create(lmcd.manifest("probe"), namespace)
    cr = lmcd.wait_observed(k8s, "probe", namespace)
    assert condition(cr, "ConfigValid") is not None


# --- 2. the examples ----------------------------------------------------------------------------


def create_first(path: Path) -> list[list[str]]:
    """The `kubectl` commands an example's comment says to run first, placeholders (`<...>`)
    filled with dummies: exactly what a user on a fresh cluster would do, and nothing more."""
    commands = []
    for line in path.read_text().splitlines():
        text = line.lstrip("#").strip()
        if line.startswith("#") and text.startswith("kubectl "):
            commands.append(re.sub(r"<[^>]+>", "dummy", text).split()[1:])
    return commands


def test_examples_that_need_secrets_say_so() -> None:
    for path in EXAMPLES:
        needs = [d["spec"] for d in lmcd_docs(path)]
        named = {s["hfTokenSecretRef"]["name"] for s in needs if "hfTokenSecretRef" in s} | {
            s["remote"]["credentialsSecretRef"]["name"]
            for s in needs
            if "credentialsSecretRef" in s.get("remote", {})
        }
        said = " ".join(" ".join(c) for c in create_first(path))
        assert all(f"secret generic {n} " in said for n in named), (path.name, named, said)


def test_there_are_examples() -> None:
    assert EXAMPLES, f"no {lmcd.KIND} under examples/"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_becomes_ready_on_gpu_nodes(
    kube: Cluster,
    k8s: Kube,
    operator: OperatorProcess,
    namespace: str,
    fake_nodes: list[NodeShape],
    path: Path,
) -> None:
    docs = lmcd_docs(path)
    for command in create_first(path):
        kube.kubectl(*command, "-n", namespace)
    gpu_nodes = {s.name for s in fake_nodes if s.gpus}
    for doc in docs:
        name = doc["metadata"]["name"]
        k8s.create(doc, namespace)
        cr = lmcd.wait_ready(k8s, name, namespace)
        replicas = cr["spec"]["replicas"]
        assert cr["status"]["readyReplicas"] == replicas
        assert cr["status"]["observedGeneration"] == cr["metadata"]["generation"]
        for api_version, kind, child in (
            ("v1", "ConfigMap", f"{name}-lmcache-config"),
            ("apps/v1", "Deployment", name),
            ("v1", "Service", name),
        ):
            obj = k8s.get(api_version, kind, child, namespace)
            assert obj and lmcd.owned_by(obj, cr), f"{kind} {child} missing or not owned by {name}"
        spec = cr["spec"]
        gpus = spec["resources"].get("gpus") or spec["vllm"]["tensorParallelSize"]
        pods = pods_of(k8s, name, namespace)
        assert len(pods) == replicas
        for pod in pods:
            requests = vllm_container(pod["spec"])["resources"]["requests"]
            assert requests["nvidia.com/gpu"] == str(gpus), requests
            assert pod["status"]["phase"] == "Running"
            assert is_true(pod, "Ready")
            assert pod["spec"]["nodeName"] in gpu_nodes, (
                f"{pod['metadata']['name']} not on a GPU node"
            )


# --- 3. hugepages -------------------------------------------------------------------------------


def test_hugepage_requests_are_computed_and_mounted(
    k8s: Kube, operator: OperatorProcess, namespace: str, fake_nodes: list[NodeShape]
) -> None:
    size, tp = 0.3, 2  # 0.3 GB is 153.6 pages: the pool must round up to 154 pages per rank
    spec = {
        "vllm": {"tensorParallelSize": tp},
        "lmcache": {"maxLocalCpuSize": size, "hugepages": {"enabled": True}},
    }
    k8s.create(lmcd.manifest("hp", **spec), namespace)
    lmcd.wait_ready(k8s, "hp", namespace)
    want = lmcd.hugepage_bytes(size, tp)
    assert want == 308 * lmcd.HUGEPAGE
    nodes = {s.name: s for s in fake_nodes}
    pods = pods_of(k8s, "hp", namespace)
    assert pods
    for pod in pods:
        res = vllm_container(pod["spec"])["resources"]
        assert lmcd.quantity_bytes(res["requests"]["hugepages-2Mi"]) == want
        assert lmcd.quantity_bytes(res["limits"]["hugepages-2Mi"]) == want
        assert hugepage_mounts(pod["spec"]), "no hugepage emptyDir mounted in the vLLM container"
        node = nodes[pod["spec"]["nodeName"]]
        assert node.hugepages_2mi and lmcd.quantity_bytes(node.hugepages_2mi) >= want
        assert node.gpus >= tp


def test_more_hugepages_than_any_node_pending_and_reported(
    k8s: Kube, operator: OperatorProcess, namespace: str, fake_nodes: list[NodeShape]
) -> None:
    size = 100  # 100 GB = 51200 pages; the largest node offers 64Gi
    spec = {"lmcache": {"maxLocalCpuSize": size, "hugepages": {"enabled": True}}}
    k8s.create(lmcd.manifest("toobig", **spec), namespace)
    pages = lmcd.hugepage_bytes(size, 1) // lmcd.HUGEPAGE

    def reported() -> Obj | None:
        c = condition(lmcd.get(k8s, "toobig", namespace), "Schedulable")
        return c if c and c["status"] == "False" else None

    verdict = wait_for("Schedulable=False", reported, timeout=60)
    assert f"hugepages-2Mi {pages * 2 // 1024}Gi" in verdict["message"], verdict["message"]

    def failed_scheduling() -> list[Obj]:
        out = []
        for pod in pods_of(k8s, "toobig", namespace):
            events = k8s.events(namespace, "Pod", pod["metadata"]["name"])
            out += [e for e in events if e["reason"] == "FailedScheduling"]
        return out

    events = wait_for("FailedScheduling events on the pods", failed_scheduling, timeout=60)
    assert all("Insufficient hugepages-2Mi" in e["message"] for e in events), events[-1]["message"]
    assert all(p["status"]["phase"] == "Pending" for p in pods_of(k8s, "toobig", namespace))
    assert not is_true(lmcd.get(k8s, "toobig", namespace), "Ready")


# --- 4. Valkey on and off -----------------------------------------------------------------------


def test_valkey_enabled_then_disabled(k8s: Kube, operator: OperatorProcess, namespace: str) -> None:
    k8s.create(lmcd.manifest("kv", valkey={"enabled": True}), namespace)
    cr = lmcd.wait_observed(k8s, "kv", namespace)

    def valkey_objects() -> dict[str, int]:
        return {
            kind: len(children(k8s, cr, api_version, kind, "valkey"))
            for api_version, kind in VALKEY_KINDS
        }

    wait_for(
        "Valkey StatefulSet, Services, Secret, NetworkPolicy",
        lambda: (
            (counts := valkey_objects())
            and counts["StatefulSet"] == 1
            and counts["Service"] >= 1
            and counts["Secret"] == 1
            and counts["NetworkPolicy"] == 1
        ),
    )
    url = lmcd.engine_config(k8s, "kv", namespace).get("remote_url")
    service = children(k8s, cr, "v1", "Service", "valkey")
    assert url and any(f"{s['metadata']['name']}.{namespace}" in url for s in service), url

    k8s.apply(lmcd.manifest("kv", valkey={"enabled": False}), namespace)
    wait_for("Valkey objects removed", lambda: not any(valkey_objects().values()))
    assert "remote_url" not in lmcd.engine_config(k8s, "kv", namespace)


# --- 5. a config change rolls out ---------------------------------------------------------------


def test_cache_size_change_rolls_out_new_replicaset(
    k8s: Kube, operator: OperatorProcess, namespace: str, fake_nodes: list[NodeShape]
) -> None:
    spec: dict[str, Any] = {"lmcache": {"maxLocalCpuSize": 2, "hugepages": {"enabled": True}}}
    k8s.create(lmcd.manifest("roll", **spec), namespace)
    lmcd.wait_ready(k8s, "roll", namespace)
    before = k8s.get("apps/v1", "Deployment", "roll", namespace)
    assert before
    old_hash = before["spec"]["template"]["metadata"]["annotations"][lmcd.CONFIG_HASH]
    old_rs = {r["metadata"]["name"] for r in k8s.items("apps/v1", "ReplicaSet", namespace)}
    assert lmcd.engine_config(k8s, "roll", namespace)["max_local_cpu_size"] == 2

    spec["lmcache"]["maxLocalCpuSize"] = 3
    k8s.apply(lmcd.manifest("roll", **spec), namespace)
    lmcd.wait_ready(k8s, "roll", namespace)
    assert lmcd.engine_config(k8s, "roll", namespace)["max_local_cpu_size"] == 3
    after = k8s.get("apps/v1", "Deployment", "roll", namespace)
    assert after
    template = after["spec"]["template"]
    assert template["metadata"]["annotations"][lmcd.CONFIG_HASH] != old_hash
    request = vllm_container(template["spec"])["resources"]["requests"]["hugepages-2Mi"]
    assert lmcd.quantity_bytes(request) == lmcd.hugepage_bytes(3, 1)

    replica_sets = k8s.items("apps/v1", "ReplicaSet", namespace)
    new = [r for r in replica_sets if r["metadata"]["name"] not in old_rs]
    assert len(new) == 1, "exactly one new ReplicaSet"
    assert new[0]["status"].get("readyReplicas") == after["spec"]["replicas"]
    assert all(r["spec"]["replicas"] == 0 for r in replica_sets if r["metadata"]["name"] in old_rs)
    for pod in pods_of(k8s, "roll", namespace):
        assert lmcd.quantity_bytes(
            vllm_container(pod["spec"])["resources"]["requests"]["hugepages-2Mi"]
        ) == lmcd.hugepage_bytes(3, 1)


# --- 6. self-healing and garbage collection ------------------------------------------------------


def test_deleted_child_restored_and_cr_deletion_garbage_collects(
    kube: Cluster, k8s: Kube, operator: OperatorProcess, namespace: str
) -> None:
    k8s.create(lmcd.manifest("heal"), namespace)
    cr = lmcd.wait_observed(k8s, "heal", namespace)
    wait_for("the Service of heal", lambda: k8s.get("v1", "Service", "heal", namespace))
    for api_version, kind, name in [
        ("v1", "Service", "heal"),
        ("v1", "ConfigMap", "heal-lmcache-config"),
        ("apps/v1", "Deployment", "heal"),
    ]:
        old = k8s.get(api_version, kind, name, namespace)
        assert old, f"{kind} {name} missing"
        k8s.delete(api_version, kind, name, namespace)
        uid = old["metadata"]["uid"]
        wait_for(
            f"{kind} {name} restored by the operator",
            functools.partial(recreated, k8s, api_version, kind, name, namespace, uid),
        )

    k8s.delete(lmcd.API_VERSION, lmcd.KIND, "heal", namespace)
    selector = "app.kubernetes.io/instance=heal"

    def all_gone() -> bool:
        return not any(
            k8s.items(api_version, kind, namespace, selector)
            for api_version, kind in [
                ("apps/v1", "Deployment"),
                ("apps/v1", "ReplicaSet"),
                ("v1", "Service"),
                ("v1", "ConfigMap"),
                ("v1", "Pod"),
            ]
        )

    wait_for("children garbage-collected", all_gone, timeout=90)
    if kube.audit_log is not None:
        deletes = [
            e
            for e in audit_events(kube.audit_log, operator.username)
            if e["verb"] == "delete" and e["objectRef"].get("namespace") == namespace
        ]
        assert not deletes, "the operator deleted children itself; the garbage collector should"
    assert cr["metadata"]["uid"]


def recreated(k8s: Kube, api_version: str, kind: str, name: str, namespace: str, uid: str) -> bool:
    new = k8s.get(api_version, kind, name, namespace)
    return bool(new and new["metadata"]["uid"] != uid)


# --- 7. CEL validation --------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(INVALID))
def test_cel_rule_refuses_invalid_cr_naming_the_field(
    k8s: Kube, release: Release, namespace: str, case: str
) -> None:
    spec, message, field = INVALID[case]
    name = case.replace(" ", "-").replace("_", "-")
    with pytest.raises(ApiException) as refused:
        k8s.create(lmcd.manifest(name, **spec), namespace)
    assert refused.value.status == 422 and refused.value.body is not None
    said = json.loads(refused.value.body)["message"]
    assert field in said and message in said, said
    assert lmcd.get(k8s, name, namespace) is None


# --- 8. crash mid-reconcile, then idle ------------------------------------------------------------


def test_killed_mid_reconcile_converges_without_duplicates_then_idles(
    kube: Cluster, k8s: Kube, operator: OperatorProcess, namespace: str, fake_nodes: list[NodeShape]
) -> None:
    names = [f"crash-{i}" for i in range(6)]
    for name in names:
        k8s.create(lmcd.manifest(name, lmcache={"maxLocalCpuSize": 1}), namespace)
    # Kill as soon as the first child exists: some CRs are done, some half-applied, some untouched.
    wait_for(
        "the operator's first child",
        lambda: (
            k8s.items("v1", "ConfigMap", namespace, "app.kubernetes.io/component=vllm")
            or k8s.items("apps/v1", "Deployment", namespace)
        ),
        timeout=60,
    )
    operator.kill()
    ready_at_kill = sum(lmcd.settled(lmcd.get(k8s, n, namespace)) for n in names)
    assert ready_at_kill < len(names), "all were done before the kill: nothing was mid-reconcile"
    operator.start()
    for name in names:
        lmcd.wait_ready(k8s, name, namespace)
    for name in names:
        cr = lmcd.get(k8s, name, namespace)
        assert cr
        for api_version, kind in (("apps/v1", "Deployment"), ("v1", "Service")):
            assert len(children(k8s, cr, api_version, kind, "vllm")) == 1, f"{kind} of {name}"
        assert len(pods_of(k8s, name, namespace)) == cr["spec"]["replicas"]
    assert len(k8s.items("apps/v1", "Deployment", namespace)) == len(names)
    assert len(k8s.items("apps/v1", "ReplicaSet", namespace)) == len(names)

    audit_log = kube.audit_log
    if audit_log is None:
        pytest.skip("the idle-write count needs the local control plane's audit log")
    # Idle means nothing changes: earlier tests' namespaces must be gone first (their teardown
    # deletes CRs and children, which the operator rightly reacts to).
    wait_for(
        "no namespace Terminating",
        lambda: (
            not [
                n for n in k8s.items("v1", "Namespace") if n["status"].get("phase") == "Terminating"
            ]
        ),
        timeout=180,
    )
    # Idle: a window of 60 s with nothing changing, long enough to span the operator's resync.
    # Lease renewals (leader election's heartbeat) are writes by design and are not counted.
    start = len(audit_events(audit_log))
    reconciles_before = reconciles(operator)
    observe(60.0)
    # The operator was working, not asleep: its resync re-checked deployments in the window.
    assert reconciles(operator) > reconciles_before, "no reconcile during the idle window"

    def writes(events: list[Obj]) -> list[str]:
        return [
            f"{e['verb']} {e['objectRef'].get('namespace')}/{e['objectRef'].get('resource')}/"
            f"{e['objectRef'].get('name')} -> {e['responseStatus'].get('code')}"
            for e in events
            if e["verb"] in WRITE_VERBS and e["objectRef"].get("resource") != "leases"
        ]

    everything = audit_events(audit_log)
    ours = operator.username
    assert writes([e for e in everything if e["user"]["username"] == ours]), (
        "no operator writes in the audit log at all: the idle count would prove nothing"
    )
    idle = writes([e for e in everything[start:] if e["user"]["username"] == ours])
    assert idle == [], f"the operator wrote while nothing changed: {idle}"


def reconciles(operator: OperatorProcess) -> float:
    """The operator's `lmcache_operator_reconciles_total`, summed over results."""
    lines = operator.metrics().splitlines()
    samples = [line for line in lines if line.startswith("lmcache_operator_reconciles_total")]
    assert samples, "the operator exports no lmcache_operator_reconciles_total"
    return sum(float(line.rsplit(" ", 1)[1]) for line in samples)


def observe(seconds: float) -> None:
    """Let a fixed window pass: the measurement itself, not a wait for something to happen."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
