"""The reconciler against an in-memory cluster (see fakes.FakeCluster for why and how real).

What matters to a platform team: first reconcile creates everything; the second writes
nothing; drift is repaired; a bad spec applies nothing and says why; disabling a feature
removes what it created; the generated password survives.
"""

from __future__ import annotations

import base64
import itertools
from typing import Any

import pytest
from lmcache_operator import api
from lmcache_operator.kube import ApiError
from lmcache_operator.reconcile import ReconcileError, Reconciler

from tests.operator.fakes import FakeCluster, custom_resource, node

CLOCK = (f"2026-01-01T{n // 3600:02d}:{n // 60 % 60:02d}:{n % 60:02d}Z" for n in itertools.count())


def reconciler(cluster: FakeCluster) -> Reconciler:
    return Reconciler(cluster, now=lambda: next(CLOCK))


def create(cluster: FakeCluster, spec: dict[str, Any], generation: int = 1) -> None:
    """Create the CR, or update its spec keeping the status, as `kubectl apply` would."""
    body = custom_resource({"model": "m", **spec}, generation=generation)
    old = cluster.objects.get((api.API_VERSION, api.KIND, "ml", "demo"))
    if old and "status" in old:
        body["status"] = old["status"]
    cluster.add(body)


def cr_status(cluster: FakeCluster) -> dict[str, Any]:
    return cluster.find(api.KIND, "demo")["status"]


def condition(cluster: FakeCluster, type_: str) -> dict[str, Any]:
    return next(c for c in cr_status(cluster)["conditions"] if c["type"] == type_)


def rollout_done(cluster: FakeCluster, replicas: int = 1) -> None:
    dep = cluster.find("Deployment", "demo")
    cluster.set_status(
        "Deployment",
        "demo",
        {
            "observedGeneration": dep["metadata"]["generation"],
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
        },
    )


def test_first_reconcile_creates_children_second_writes_nothing(cluster: FakeCluster) -> None:
    create(cluster, {"valkey": {"enabled": True}})
    r = reconciler(cluster)
    assert r.reconcile("ml", "demo") is True
    assert cluster.kinds() == [
        ("ConfigMap", "demo-lmcache-config"),
        ("ConfigMap", "demo-valkey-config"),
        ("Deployment", "demo"),
        ("NetworkPolicy", "demo-valkey"),
        ("Secret", "demo-valkey-auth"),
        ("Service", "demo"),
        ("Service", "demo-valkey"),
        ("Service", "demo-valkey-headless"),
        ("StatefulSet", "demo-valkey"),
    ]
    assert ("Normal", "Applied") in [(t, r_) for t, r_, _ in cluster.events]
    cluster.writes.clear()
    cluster.events.clear()
    r.reconcile("ml", "demo")
    assert cluster.writes == []  # server defaults and status do not look like drift
    assert cluster.events == []


def test_status_after_rollout_is_ready_and_then_stable(cluster: FakeCluster) -> None:
    create(cluster, {})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    assert cr_status(cluster)["phase"] == "Progressing"
    assert condition(cluster, "Ready")["status"] == "False"
    rollout_done(cluster)
    r.reconcile("ml", "demo")
    st = cr_status(cluster)
    assert st["phase"] == "Ready"
    assert (st["replicas"], st["readyReplicas"], st["observedGeneration"]) == (1, 1, 1)
    assert st["selector"] == "app.kubernetes.io/component=vllm,app.kubernetes.io/instance=demo"
    assert len(st["configHash"]) == 16
    ready = condition(cluster, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Available")
    assert ("Normal", "Available") in [(t, r_) for t, r_, _ in cluster.events]
    stamp = ready["lastTransitionTime"]
    cluster.writes.clear()
    r.reconcile("ml", "demo")
    assert cluster.writes == []
    assert condition(cluster, "Ready")["lastTransitionTime"] == stamp


def test_all_eight_conditions_carry_observed_generation(cluster: FakeCluster) -> None:
    create(cluster, {}, generation=7)
    reconciler(cluster).reconcile("ml", "demo")
    conds = cr_status(cluster)["conditions"]
    assert {c["type"] for c in conds} == {
        "Ready",
        "Progressing",
        "Degraded",
        "ConfigValid",
        "ValkeyReady",
        "Schedulable",
        "Reconciling",
        "Stalled",
    }
    assert {c["observedGeneration"] for c in conds} == {7}


def test_kstatus_conditions_follow_the_rollout(cluster: FakeCluster) -> None:
    """kstatus (Flux, Argo CD, cli-utils): Reconciling while working, Stalled when stuck."""
    create(cluster, {})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    assert (
        condition(cluster, "Reconciling")["status"],
        condition(cluster, "Stalled")["status"],
    ) == (
        "True",
        "False",
    )
    rollout_done(cluster)
    r.reconcile("ml", "demo")
    assert condition(cluster, "Reconciling")["status"] == "False"
    create(cluster, {"vllm": {"extraArgs": ["--port=1"]}}, generation=2)
    r.reconcile("ml", "demo")
    stalled = condition(cluster, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "InvalidSpec")
    assert condition(cluster, "Reconciling")["status"] == "False"
    # They restate Ready/Degraded: no Events of their own.
    assert not any(m.startswith(("Stalled", "Reconciling")) for _, _, m in cluster.events)


def test_status_records_the_engine_image_and_sizing(cluster: FakeCluster) -> None:
    create(cluster, {"vllm": {"tensorParallelSize": 2}, "replicas": 1})
    reconciler(cluster).reconcile("ml", "demo")
    st = cr_status(cluster)
    assert st["engineImage"] == f"{api.DEFAULT_IMAGE_REPOSITORY}:{api.DEFAULT_IMAGE_TAG}"
    # The CRD stores no image default: an operator upgrade moves every deployment along.
    assert "tag" not in cluster.find(api.KIND, "demo")["spec"]["image"]
    sizing = st["sizing"]
    # 8Gi + 2 x 8Gi for vLLM, 2 x 1Gi of /dev/shm, 2 x 5 GB of pinned pool
    assert sizing["memoryPerPod"] == "36Gi"
    assert sizing["gpusPerPod"] == 2
    # The fixture's node: 8 GPUs (4 pods of 2), 512Gi memory (14 pods of 36Gi)
    assert (sizing["eligibleNodes"], sizing["maxReplicas"], sizing["additionalReplicas"]) == (
        1,
        4,
        3,
    )


def test_deleted_child_is_restored(cluster: FakeCluster) -> None:
    create(cluster, {})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    cluster.delete("v1", "ConfigMap", "ml", "demo-lmcache-config")
    cluster.writes.clear()
    r.reconcile("ml", "demo")
    assert cluster.writes == [("apply", "ConfigMap", "demo-lmcache-config")]


def test_hand_edited_field_is_restored(cluster: FakeCluster) -> None:
    create(cluster, {"lmcache": {"hugepages": {"enabled": True}}})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    dep = cluster.find("Deployment", "demo")
    dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["hugepages-2Mi"] = "1Gi"
    dep["metadata"]["labels"]["extra"] = "added-by-someone"  # not ours: left alone
    cluster.writes.clear()
    r.reconcile("ml", "demo")
    assert cluster.writes == [("apply", "Deployment", "demo")]
    limits = cluster.find("Deployment", "demo")["spec"]["template"]["spec"]["containers"][0][
        "resources"
    ]["limits"]
    assert limits["hugepages-2Mi"] == "5Gi"


def test_spec_change_rolls_pods_through_the_config_hash(cluster: FakeCluster) -> None:
    create(cluster, {})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    before = cluster.find("Deployment", "demo")["spec"]["template"]["metadata"]["annotations"][
        api.ANNOTATION_CONFIG_HASH
    ]
    create(cluster, {"lmcache": {"chunkSize": 512}}, generation=2)
    cluster.writes.clear()
    r.reconcile("ml", "demo")
    assert ("apply", "ConfigMap", "demo-lmcache-config") in cluster.writes
    after = cluster.find("Deployment", "demo")["spec"]["template"]["metadata"]["annotations"][
        api.ANNOTATION_CONFIG_HASH
    ]
    assert after != before
    assert cr_status(cluster)["configHash"] == after


def test_invalid_spec_applies_nothing_and_says_why(cluster: FakeCluster) -> None:
    create(cluster, {"lmcache": {"extraConfig": {"chunk_size": 1}}})
    reconciler(cluster).reconcile("ml", "demo")
    assert cluster.kinds() == []  # no half-applied children
    valid = condition(cluster, "ConfigValid")
    assert (valid["status"], valid["reason"]) == ("False", "InvalidSpec")
    assert "spec.lmcache.extraConfig.chunk_size" in valid["message"]
    assert cr_status(cluster)["phase"] == "Invalid"
    warnings = [(r_, m) for t, r_, m in cluster.events if t == "Warning"]
    assert any(r_ == "InvalidSpec" and "chunk_size" in m for r_, m in warnings)


def test_invalid_update_keeps_running_children_untouched(cluster: FakeCluster) -> None:
    create(cluster, {})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    good_hash = cr_status(cluster)["configHash"]
    create(cluster, {"vllm": {"extraArgs": ["--port=1"]}}, generation=2)
    cluster.writes.clear()
    r.reconcile("ml", "demo")
    assert [w for w in cluster.writes if w[0] != "status"] == []
    assert cr_status(cluster)["configHash"] == good_hash
    assert cr_status(cluster)["observedGeneration"] == 2


def test_fixing_the_spec_recovers(cluster: FakeCluster) -> None:
    create(cluster, {"vllm": {"extraArgs": ["--port=1"]}})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    assert cluster.kinds() == []
    create(cluster, {}, generation=2)
    r.reconcile("ml", "demo")
    assert condition(cluster, "ConfigValid")["status"] == "True"
    assert ("Deployment", "demo") in cluster.kinds()


def test_disabling_valkey_prunes_its_children(cluster: FakeCluster) -> None:
    create(cluster, {"valkey": {"enabled": True}})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    create(cluster, {}, generation=2)
    r.reconcile("ml", "demo")
    assert cluster.kinds() == [
        ("ConfigMap", "demo-lmcache-config"),
        ("Deployment", "demo"),
        ("Service", "demo"),
    ]  # the generated Secret too, although it is not watched
    assert "valkeyEndpoint" not in cr_status(cluster)


def test_generated_password_is_created_once_and_never_rewritten(cluster: FakeCluster) -> None:
    create(cluster, {"valkey": {"enabled": True}})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    first = cluster.find("Secret", "demo-valkey-auth")["data"]["password"]
    assert len(base64.b64decode(first)) == 48
    assert ("create", "Secret", "demo-valkey-auth") in cluster.writes
    cluster.writes.clear()
    create(cluster, {"valkey": {"enabled": True, "maxMemory": "8Gi"}}, generation=2)
    r.reconcile("ml", "demo")
    assert cluster.find("Secret", "demo-valkey-auth")["data"]["password"] == first
    assert not [w for w in cluster.writes if w[1] == "Secret"]


def secret_hashes(cluster: FakeCluster) -> tuple[str, str]:
    pods = [
        cluster.find(kind, name)["spec"]["template"]["metadata"]["annotations"]
        for kind, name in (("Deployment", "demo"), ("StatefulSet", "demo-valkey"))
    ]
    return pods[0][api.ANNOTATION_SECRET_HASH], pods[1][api.ANNOTATION_SECRET_HASH]


def test_deleted_password_is_not_regenerated_while_valkey_runs(cluster: FakeCluster) -> None:
    """A new password would split the running server from new clients (failed AUTH behind
    the breaker): stop, say why, and let a human choose."""
    create(cluster, {"valkey": {"enabled": True}})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    before = cluster.find("StatefulSet", "demo-valkey")
    cluster.delete("v1", "Secret", "ml", "demo-valkey-auth")
    cluster.writes.clear()
    with pytest.raises(ReconcileError, match="demo-valkey-auth"):
        r.reconcile("ml", "demo")
    assert [w for w in cluster.writes if w[0] != "status"] == []
    assert cluster.find("StatefulSet", "demo-valkey") == before
    degraded = condition(cluster, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "SecretMissing")
    assert "delete that StatefulSet" in degraded["message"]
    # The human's way out: drop the server; a new password and server come together, and
    # the vLLM pods roll to it.
    old_hash = secret_hashes(cluster)[0]
    cluster.delete("apps/v1", "StatefulSet", "ml", "demo-valkey")
    r.reconcile("ml", "demo")
    assert cluster.find("Secret", "demo-valkey-auth")
    new_vllm, new_valkey = secret_hashes(cluster)
    assert new_vllm == new_valkey != old_hash


def test_rotating_an_existing_secret_rolls_both_workloads(cluster: FakeCluster) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "mine", "namespace": "ml", "uid": "s1", "resourceVersion": "5"},
        "data": {"password": "b2xk"},
    }
    cluster.add(secret)
    create(cluster, {"valkey": {"enabled": True, "auth": {"existingSecret": "mine"}}})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    first = secret_hashes(cluster)
    assert first[0] == first[1]
    cluster.writes.clear()
    r.reconcile("ml", "demo")
    assert cluster.writes == []  # an unchanged Secret rolls nothing
    cluster.find("Secret", "mine")["metadata"]["resourceVersion"] = "6"  # rotated
    r.reconcile("ml", "demo")
    second = secret_hashes(cluster)
    assert second[0] == second[1] != first[0]
    # The operator only ever read the Secret's metadata.
    assert ("metadata", "Secret", "mine") in cluster.reads


def test_missing_existing_secret_is_reported_not_guessed(cluster: FakeCluster) -> None:
    create(cluster, {"valkey": {"enabled": True, "auth": {"existingSecret": "later"}}})
    with pytest.raises(ReconcileError, match="Secret later"):
        reconciler(cluster).reconcile("ml", "demo")
    degraded = condition(cluster, "Degraded")
    assert degraded["reason"] == "SecretMissing"
    assert "valkey.auth.existingSecret" in degraded["message"]
    assert ("Secret", "demo-valkey-auth") not in cluster.kinds()


def test_valkey_ready_condition_and_endpoint(cluster: FakeCluster) -> None:
    create(cluster, {"valkey": {"enabled": True}})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    assert condition(cluster, "ValkeyReady")["status"] == "False"
    rollout_done(cluster)
    r.reconcile("ml", "demo")
    assert condition(cluster, "Ready")["reason"] == "ValkeyNotReady"
    sts = cluster.find("StatefulSet", "demo-valkey")
    cluster.set_status(
        "StatefulSet",
        "demo-valkey",
        {"readyReplicas": 1, "observedGeneration": sts["metadata"]["generation"]},
    )
    r.reconcile("ml", "demo")
    assert condition(cluster, "ValkeyReady")["status"] == "True"
    assert condition(cluster, "Ready")["status"] == "True"
    assert cr_status(cluster)["valkeyEndpoint"] == "demo-valkey.ml.svc:6379"


def test_schedulable_names_what_is_short() -> None:
    cluster = FakeCluster(
        nodes=[
            node("small", gpus=8, hugepages="2Gi"),
            node("cordoned", gpus=8, hugepages="64Gi", unschedulable=True),
        ]
    )
    create(
        cluster, {"lmcache": {"hugepages": {"enabled": True}}, "vllm": {"tensorParallelSize": 2}}
    )
    reconciler(cluster).reconcile("ml", "demo")
    cond = condition(cluster, "Schedulable")
    assert (cond["status"], cond["reason"]) == ("False", "InsufficientCapacity")
    assert "hugepages-2Mi 10Gi" in cond["message"]
    assert "the closest, small, offers hugepages-2Mi 2Gi < 10Gi" in cond["message"]
    assert any(r_ == "InsufficientCapacity" for _, r_, _ in cluster.events)


def test_schedulable_is_evaluated_with_hugepages_off_too() -> None:
    """Without hugepages the pool is container memory: a node too small for it fails."""
    cluster = FakeCluster(nodes=[node("small", gpus=8, memory="16Gi")])
    create(cluster, {})
    reconciler(cluster).reconcile("ml", "demo")
    cond = condition(cluster, "Schedulable")
    assert cond["status"] == "False"
    assert "memory 16Gi < 22Gi" in cond["message"]


def test_schedulable_respects_node_selector() -> None:
    cluster = FakeCluster(
        nodes=[
            node("a", hugepages="64Gi", labels={"pool": "a"}),
            node("b", hugepages="64Gi", labels={"pool": "b"}),
        ]
    )
    create(cluster, {"lmcache": {"hugepages": {"enabled": True}}, "nodeSelector": {"pool": "b"}})
    reconciler(cluster).reconcile("ml", "demo")
    cond = condition(cluster, "Schedulable")
    assert cond["status"] == "True" and "node b" in cond["message"]


def test_unreadable_nodes_make_the_condition_unknown() -> None:
    cluster = FakeCluster(nodes=None)
    create(cluster, {})
    reconciler(cluster).reconcile("ml", "demo")
    assert condition(cluster, "Schedulable")["status"] == "Unknown"


def test_apply_failure_is_degraded_and_retried(cluster: FakeCluster) -> None:
    create(cluster, {})
    cluster.fail_apply = {"ConfigMap": [ApiError(422, "PATCH", "/x", "field is immutable")]}
    with pytest.raises(ReconcileError, match="immutable"):
        reconciler(cluster).reconcile("ml", "demo")
    degraded = condition(cluster, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ApplyFailed")
    assert cr_status(cluster)["phase"] == "Degraded"


def test_progress_deadline_is_degraded(cluster: FakeCluster) -> None:
    create(cluster, {})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    cluster.set_status(
        "Deployment",
        "demo",
        {
            "conditions": [
                {
                    "type": "Progressing",
                    "status": "False",
                    "reason": "ProgressDeadlineExceeded",
                    "message": "ReplicaSet demo-abc has timed out progressing.",
                }
            ]
        },
    )
    r.reconcile("ml", "demo")
    assert condition(cluster, "Degraded")["reason"] == "ProgressDeadlineExceeded"
    assert condition(cluster, "Progressing")["status"] == "False"


def test_scaled_to_zero_is_ready(cluster: FakeCluster) -> None:
    create(cluster, {"replicas": 0})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    rollout_done(cluster, replicas=0)
    r.reconcile("ml", "demo")
    assert condition(cluster, "Ready")["reason"] == "ScaledToZero"


def test_gone_or_deleting_objects_are_left_to_garbage_collection(cluster: FakeCluster) -> None:
    assert reconciler(cluster).reconcile("ml", "missing") is False
    create(cluster, {})
    cluster.find(api.KIND, "demo")["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert reconciler(cluster).reconcile("ml", "demo") is False
    assert cluster.writes == []


def test_a_new_deployment_is_not_a_warning_but_an_invalid_one_is_once(
    cluster: FakeCluster,
) -> None:
    create(cluster, {})
    reconciler(cluster).reconcile("ml", "demo")
    assert [e for e in cluster.events if e[0] == "Warning"] == []
    other = FakeCluster(nodes=[])
    create(other, {"vllm": {"extraArgs": ["--port=1"]}})
    reconciler(other).reconcile("ml", "demo")
    warnings = [r_ for t, r_, _ in other.events if t == "Warning"]
    assert warnings.count("InvalidSpec") == 1


def test_a_foreign_object_with_a_childs_name_is_never_adopted(cluster: FakeCluster) -> None:
    cluster.add(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "demo", "namespace": "ml"},
            "spec": {"type": "NodePort"},
        }
    )
    create(cluster, {})
    with pytest.raises(ReconcileError, match="Service/demo exists and is not controlled"):
        reconciler(cluster).reconcile("ml", "demo")
    assert cluster.find("Service", "demo")["spec"] == {"type": "NodePort"}
    assert condition(cluster, "Degraded")["reason"] == "ApplyFailed"
    # What was applied before the conflict is reported.
    assert any(r_ == "Applied" for _, r_, _ in cluster.events)


def test_immutable_statefulset_change_replaces_the_valkey_server(cluster: FakeCluster) -> None:
    create(cluster, {"valkey": {"enabled": True}})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    create(cluster, {"valkey": {"enabled": True, "persistence": {"enabled": True}}}, generation=2)
    refused = (
        'StatefulSet.apps "demo-valkey" is invalid: spec: Forbidden: updates to statefulset spec '
        "for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', "
        "'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden"
    )
    cluster.fail_apply = {"StatefulSet": [ApiError(422, "PATCH", "/x", refused)]}
    cluster.writes.clear()
    r.reconcile("ml", "demo")
    assert ("delete", "StatefulSet", "demo-valkey") in cluster.writes
    sts = cluster.find("StatefulSet", "demo-valkey")
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_wrong_types_without_the_crd_schema_are_invalid_not_a_crash(
    cluster: FakeCluster,
) -> None:
    body = custom_resource({"model": "m"})
    body["spec"]["replicas"] = "two"  # as if the CRD were older than the operator
    cluster.add(body)
    reconciler(cluster).reconcile("ml", "demo")
    assert "spec.replicas: expected int" in condition(cluster, "ConfigValid")["message"]
    assert cluster.kinds() == []


def test_terminating_namespace_stops_the_reconcile_quietly(cluster: FakeCluster) -> None:
    create(cluster, {})
    refused = ApiError(
        403,
        "PATCH",
        "/x",
        "unable to create new content in namespace ml because it is being terminated",
    )
    cluster.fail_apply = {"ConfigMap": [refused]}
    assert reconciler(cluster).reconcile("ml", "demo") is False
    cr = cluster.get(api.API_VERSION, api.KIND, "ml", "demo")
    assert cr is not None and "status" not in cr, "no status written for a dying namespace"


def test_other_invalid_statefulset_changes_never_delete_valkey(cluster: FakeCluster) -> None:
    create(cluster, {"valkey": {"enabled": True}})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    create(cluster, {"valkey": {"enabled": True, "persistence": {"enabled": True}}}, generation=2)
    invalid = ApiError(422, "PATCH", "/x", "spec.volumeClaimTemplates[0]: Invalid value")
    cluster.fail_apply = {"StatefulSet": [invalid]}
    cluster.writes.clear()
    with pytest.raises(ReconcileError):
        r.reconcile("ml", "demo")
    assert ("delete", "StatefulSet", "demo-valkey") not in cluster.writes


def test_items_other_managers_add_to_list_maps_cause_no_churn(cluster: FakeCluster) -> None:
    """A webhook injects a sidecar and an env var; server-side apply keeps both, and so must
    the no-churn check, or every reconcile would re-apply the Deployment."""
    create(cluster, {})
    r = reconciler(cluster)
    r.reconcile("ml", "demo")
    pod = cluster.find("Deployment", "demo")["spec"]["template"]["spec"]
    pod["containers"][0]["env"].insert(0, {"name": "INJECTED", "value": "1"})
    pod["containers"].append({"name": "istio-proxy", "image": "proxy"})
    pod["volumes"].append({"name": "istio-data", "emptyDir": {}})
    cluster.writes.clear()
    r.reconcile("ml", "demo")
    assert cluster.writes == []
    # A hand edit of one of ours still counts.
    pod["containers"][0]["env"] = [e for e in pod["containers"][0]["env"] if e["name"] != "HF_HOME"]
    r.reconcile("ml", "demo")
    assert cluster.writes == [("apply", "Deployment", "demo")]


def test_a_deployment_without_valkey_never_asks_for_its_server(cluster: FakeCluster) -> None:
    """At 1000 deployments a GET per reconcile for a StatefulSet that does not exist adds up:
    the check for the generated password's server reads the cached children only."""
    asked: list[tuple[str, str]] = []
    original = cluster.get

    def get(api_version: str, kind: str, namespace: str, name: str) -> Any:
        asked.append((kind, name))
        return original(api_version, kind, namespace, name)

    cluster.get = get  # type: ignore[method-assign]
    create(cluster, {})
    reconciler(cluster).reconcile("ml", "demo")
    assert ("StatefulSet", "demo-valkey") not in asked
