"""The harness itself: fake nodes, real scheduling on GPU/hugepage resources, kwok readiness, GC.

If these fail, every operator e2e test would fail for reasons that are not the operator's.
"""

from __future__ import annotations

from e2e.cluster import ADMIN_USER, MAX_NODE_HUGEPAGES_GI, NodeShape
from e2e.kube import Cluster, Kube, Obj, audit_events, condition, is_true, wait_for
from e2e.operator_proc import expand

PAUSE = "registry.k8s.io/pause:3.10"


def gpu_pod_spec(gpus: int, hugepages: str) -> Obj:
    """A pod needing GPUs and 2 MiB hugepages, mounting them the way the operator's pods do."""
    limits = {"nvidia.com/gpu": str(gpus), "hugepages-2Mi": hugepages, "memory": "1Gi", "cpu": "1"}
    return {
        "containers": [
            {
                "name": "main",
                "image": PAUSE,
                "resources": {"requests": limits, "limits": limits},
                "volumeMounts": [{"name": "hugepages", "mountPath": "/dev/hugepages"}],
            }
        ],
        "volumes": [{"name": "hugepages", "emptyDir": {"medium": "HugePages-2Mi"}}],
    }


def deployment(name: str, replicas: int, spec: Obj) -> Obj:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }


def test_fake_nodes_advertise_gpus_and_hugepages(k8s: Kube, fake_nodes: list[NodeShape]) -> None:
    nodes = {n["metadata"]["name"]: n for n in k8s.items("v1", "Node")}
    for shape in fake_nodes:
        node = nodes[shape.name]
        assert node["status"]["allocatable"] == shape.resources(), shape.name
        assert node["status"]["capacity"] == shape.resources(), shape.name
        assert is_true(node, "Ready"), shape.name
    allocatable = [nodes[s.name]["status"]["allocatable"] for s in fake_nodes]
    assert any("hugepages-2Mi" not in a and "nvidia.com/gpu" in a for a in allocatable)
    assert any("nvidia.com/gpu" not in a for a in allocatable)


def test_gpu_hugepage_deployment_becomes_available_on_fitting_nodes(
    k8s: Kube, namespace: str, fake_nodes: list[NodeShape]
) -> None:
    k8s.create(deployment("fits", 3, gpu_pod_spec(1, "2Gi")), namespace)

    def available() -> Obj | None:
        d = k8s.get("apps/v1", "Deployment", "fits", namespace)
        ready = (d or {}).get("status", {}).get("readyReplicas")
        return d if is_true(d, "Available") and ready == 3 else None

    wait_for("Deployment fits Available with 3 ready replicas", available, timeout=60)
    pods = k8s.items("v1", "Pod", namespace, "app=fits")
    assert len(pods) == 3
    fitting = {s.name for s in fake_nodes if s.gpus and s.hugepages_2mi}
    for pod in pods:
        name, node = pod["metadata"]["name"], pod["spec"]["nodeName"]
        assert pod["status"]["phase"] == "Running", name
        assert is_true(pod, "Ready"), name
        assert node in fitting, f"{name} scheduled on {node}, which lacks GPUs or hugepages"
        assert pod["status"]["podIP"], f"{name}: kwok assigns pod IPs"


def test_more_hugepages_than_any_node_stays_pending_with_scheduler_reason(
    k8s: Kube, namespace: str, fake_nodes: list[NodeShape]
) -> None:
    too_many = f"{MAX_NODE_HUGEPAGES_GI * 2}Gi"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "huge"},
        "spec": gpu_pod_spec(1, too_many),
    }
    k8s.create(pod, namespace)

    def unschedulable() -> Obj | None:
        c = condition(k8s.get("v1", "Pod", "huge", namespace), "PodScheduled")
        return c if c and c["status"] == "False" and c["reason"] == "Unschedulable" else None

    scheduled = wait_for("PodScheduled=False/Unschedulable", unschedulable, timeout=30)
    assert "Insufficient hugepages-2Mi" in scheduled["message"]
    assert (k8s.get("v1", "Pod", "huge", namespace) or {})["status"]["phase"] == "Pending"
    failed = wait_for(
        "a FailedScheduling event",
        lambda: [
            e for e in k8s.events(namespace, "Pod", "huge") if e["reason"] == "FailedScheduling"
        ],
        timeout=30,
    )
    assert "Insufficient hugepages-2Mi" in failed[-1]["message"]


def test_garbage_collector_deletes_dependents_of_a_deleted_owner(k8s: Kube, namespace: str) -> None:
    k8s.create(
        deployment("owned", 2, {"containers": [{"name": "main", "image": PAUSE}]}), namespace
    )
    wait_for(
        "2 pods of Deployment owned",
        lambda: len(k8s.items("v1", "Pod", namespace, "app=owned")) == 2,
    )
    replica_sets = k8s.items("apps/v1", "ReplicaSet", namespace, "app=owned")
    assert len(replica_sets) == 1
    assert replica_sets[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment"

    k8s.delete("apps/v1", "Deployment", "owned", namespace, propagation="Background")
    wait_for(
        "the garbage collector to delete the ReplicaSet and its pods",
        lambda: (
            not k8s.items("apps/v1", "ReplicaSet", namespace, "app=owned")
            and not k8s.items("v1", "Pod", namespace, "app=owned")
        ),
        timeout=90,
    )


def test_default_storage_class_provisions_and_binds_claims(
    k8s: Kube, namespace: str, fake_nodes: list[NodeShape]
) -> None:
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}}},
    }
    k8s.create(claim, namespace)
    bound = wait_for(
        "PVC data Bound",
        lambda: (
            (pvc := k8s.get("v1", "PersistentVolumeClaim", "data", namespace))
            and pvc["status"].get("phase") == "Bound"
            and pvc
        ),
        timeout=30,
    )
    assert bound["spec"]["storageClassName"], "the default StorageClass was applied"


def test_audit_log_records_writes_by_user(
    kube: Cluster, k8s: Kube, namespace: str, fake_nodes: list[NodeShape]
) -> None:
    """The operator's idle-write check counts audit events; prove they are there and per user."""
    audit_log = kube.audit_log
    assert audit_log is not None
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe"}}
    k8s.create(config_map, namespace)

    def created() -> list[str]:
        return [
            e["objectRef"]["name"]
            for e in audit_events(audit_log, ADMIN_USER)
            if e["verb"] == "create"
            and e["objectRef"].get("namespace") == namespace
            and e["objectRef"]["resource"] == "configmaps"
        ]

    assert wait_for("the audit event of the create", created, timeout=10) == ["probe"]


def test_operator_args_expand_like_the_kubelet() -> None:
    """`$(VAR)` in the chart's args resolves as in the kubelet; `$$` escapes; unknown stays."""
    env = {"POD_NAMESPACE": "lmcache-system"}
    assert expand("--ns=$(POD_NAMESPACE)", env) == "--ns=lmcache-system"
    assert expand("--literal=$$(POD_NAMESPACE)", env) == "--literal=$(POD_NAMESPACE)"
    assert expand("--other=$(NOT_SET)", env) == "--other=$(NOT_SET)"
