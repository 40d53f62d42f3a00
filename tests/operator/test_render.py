"""Spec → manifests: every field lands where it should, and the arithmetic is right."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import yaml
from lmcache_operator import api, quantity
from lmcache_operator.render import bundle, engine_config, sizing, valkey, vllm
from lmcache_operator.render.common import Owner
from lmcache_operator.spec import parse

OWNER = Owner(name="demo", namespace="ml", uid="uid-demo")


def rendered(spec: dict[str, Any], secret_hash: str | None = None) -> dict[tuple[str, str], Any]:
    out = bundle.render(parse({"model": "m", **spec}), OWNER, secret_hash)
    return {(m["kind"], m["metadata"]["name"]): m for m in out.manifests}


def pod(spec: dict[str, Any]) -> dict[str, Any]:
    return rendered(spec)[("Deployment", "demo")]["spec"]["template"]["spec"]


def container(spec: dict[str, Any]) -> dict[str, Any]:
    return pod(spec)["containers"][0]


def config(spec: dict[str, Any]) -> dict[str, Any]:
    cm = rendered(spec)[("ConfigMap", "demo-lmcache-config")]
    return yaml.safe_load(cm["data"]["config.yaml"])


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


# --- hugepage and memory arithmetic -------------------------------------------------------


@pytest.mark.parametrize(
    ("size_gb", "pages"), [(5.0, 2560), (1.0, 512), (0.001, 1), (2.5, 1280), (0.5, 256)]
)
def test_pages_per_rank_is_ceil_of_size_over_2mib(size_gb: float, pages: int) -> None:
    assert sizing.pages_per_rank(size_gb) == pages


def test_hugepages_5gb_request_equals_limit_5gi() -> None:
    res = container({"lmcache": {"hugepages": {"enabled": True}}})["resources"]
    assert res["requests"]["hugepages-2Mi"] == "5Gi"
    assert res["limits"]["hugepages-2Mi"] == "5Gi"


def test_hugepages_scale_with_tensor_parallel_ranks() -> None:
    spec = {
        "lmcache": {"hugepages": {"enabled": True}, "maxLocalCpuSize": 5},
        "vllm": {"tensorParallelSize": 4},
    }
    res = container(spec)["resources"]
    assert res["limits"]["hugepages-2Mi"] == "20Gi"  # 4 ranks × 2560 pages × 2 MiB
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "4"


def test_odd_sizes_round_up_to_whole_pages_in_canonical_form() -> None:
    res = container({"lmcache": {"hugepages": {"enabled": True}, "maxLocalCpuSize": 1.001}})
    # ceil(1.001 GiB / 2 MiB) = 513 pages = 1026Mi
    assert res["resources"]["limits"]["hugepages-2Mi"] == "1026Mi"


def test_with_hugepages_memory_is_vllm_memory_and_shm() -> None:
    res = container({"lmcache": {"hugepages": {"enabled": True}}, "resources": {"memory": "16Gi"}})
    assert res["resources"]["requests"]["memory"] == "17Gi"  # + 1Gi of /dev/shm
    assert res["resources"]["limits"]["memory"] == "17Gi"


def test_without_hugepages_the_pinned_pool_is_added_to_memory() -> None:
    res = container(
        {
            "resources": {"memory": "16Gi"},
            "vllm": {"tensorParallelSize": 2},
            "lmcache": {"maxLocalCpuSize": 5},
        }
    )["resources"]
    assert res["requests"]["memory"] == res["limits"]["memory"] == "28Gi"  # 16 + 2 × 1 + 2 × 5
    assert "hugepages-2Mi" not in res["requests"]


def test_pool_counts_even_with_local_cpu_off() -> None:
    # The engine keeps the pinned pool as a staging buffer for disk/remote either way.
    res = container({"lmcache": {"localCpu": False}, "resources": {"memory": "8Gi"}})
    assert res["resources"]["limits"]["memory"] == "14Gi"


def test_decimal_memory_plus_pool_stays_exact() -> None:
    memory = container({"resources": {"memory": "16G"}})["resources"]["limits"]["memory"]
    assert quantity.parse(memory) == 16 * 10**9 + 2**30 + 5 * 2**30


@pytest.mark.parametrize(
    ("tp", "memory", "shm"), [(1, "22Gi", "1Gi"), (2, "36Gi", "2Gi"), (8, "120Gi", "8Gi")]
)
def test_default_memory_and_shm_scale_with_tensor_parallel_ranks(
    tp: int, memory: str, shm: str
) -> None:
    """vLLM runs an API process plus one worker per rank, each with its own CUDA context:
    8Gi + 8Gi per rank, plus /dev/shm (1Gi per rank, bounded) and the pool (5 GB per rank)."""
    spec = {"vllm": {"tensorParallelSize": tp}, "lmcache": {"maxLocalCpuSize": 5}}
    assert container(spec)["resources"]["limits"]["memory"] == memory
    shm_volume = next(v for v in pod(spec)["volumes"] if v["name"] == "dshm")
    assert shm_volume["emptyDir"] == {"medium": "Memory", "sizeLimit": shm}


# --- the vLLM pod ---------------------------------------------------------------------------


def test_vllm_command_has_kv_transfer_config_and_model_flags() -> None:
    c = container(
        {
            "servedModelName": "llama",
            "vllm": {
                "maxModelLen": 8192,
                "tensorParallelSize": 2,
                "gpuMemoryUtilization": 0.85,
                "extraArgs": ["--enable-prefix-caching"],
            },
        }
    )
    assert c["command"] == ["vllm", "serve"]
    args = c["args"]
    assert args[0] == "m"
    kv = next(a for a in args if a.startswith("--kv-transfer-config="))
    assert json.loads(kv.split("=", 1)[1]) == {
        "kv_connector": "LMCacheConnectorV1",
        "kv_role": "kv_both",
        # vLLM's default, "fail", ends a request whose KV cannot be loaded; recompute it.
        "kv_load_failure_policy": "recompute",
    }
    assert "--max-model-len=8192" in args
    assert "--tensor-parallel-size=2" in args
    assert "--gpu-memory-utilization=0.85" in args
    assert "--served-model-name=llama" in args
    assert args[-1] == "--enable-prefix-caching"


def test_config_is_a_projected_volume_at_the_fixed_path() -> None:
    p = pod({})
    vol = next(v for v in p["volumes"] if v["name"] == "lmcache-config")
    source = vol["projected"]["sources"][0]["configMap"]
    assert source["name"] == "demo-lmcache-config"
    mount = next(m for m in p["containers"][0]["volumeMounts"] if m["name"] == "lmcache-config")
    assert mount == {"name": "lmcache-config", "mountPath": "/etc/lmcache", "readOnly": True}
    assert env_of(p["containers"][0])["LMCACHE_CONFIG_FILE"] == "/etc/lmcache/config.yaml"


def test_dev_shm_always_and_hugepage_volume_only_with_hugepages() -> None:
    plain = {v["name"]: v for v in pod({})["volumes"]}
    assert plain["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}
    assert "hugepages" not in plain
    huge = {v["name"]: v for v in pod({"lmcache": {"hugepages": {"enabled": True}}})["volumes"]}
    assert huge["hugepages"]["emptyDir"] == {"medium": "HugePages-2Mi"}


def test_probes_ports_and_config_hash_annotation() -> None:
    dep = rendered({})[("Deployment", "demo")]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "http": 8000,
        "lmcache-metrics": 9090,
    }
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert (
        annotations[api.ANNOTATION_CONFIG_HASH]
        == bundle.render(parse({"model": "m"}), OWNER, None).config_hash
    )


def test_placement_pod_metadata_and_image_fields() -> None:
    spec = {
        "image": {
            "repository": "r/x",
            "tag": "1",
            "pullPolicy": "Always",
            "pullSecrets": ["regcred"],
        },
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {}},
        "priorityClassName": "high",
        "runtimeClassName": "nvidia",
        "serviceAccountName": "vllm",
        "podAnnotations": {"a": "b"},
        "podLabels": {"team": "ml", api.LABEL_INSTANCE: "spoof"},
    }
    dep = rendered(spec)[("Deployment", "demo")]
    tmpl = dep["spec"]["template"]
    p = tmpl["spec"]
    assert p["containers"][0]["image"] == "r/x:1"
    assert p["containers"][0]["imagePullPolicy"] == "Always"
    assert p["imagePullSecrets"] == [{"name": "regcred"}]
    assert p["nodeSelector"] == {"gpu": "h100"}
    assert p["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert p["priorityClassName"] == "high"
    assert p["runtimeClassName"] == "nvidia"
    assert p["serviceAccountName"] == "vllm"
    assert tmpl["metadata"]["annotations"]["a"] == "b"
    assert tmpl["metadata"]["labels"]["team"] == "ml"
    # A user label can never break the selector.
    assert tmpl["metadata"]["labels"][api.LABEL_INSTANCE] == "demo"
    assert dep["spec"]["selector"]["matchLabels"].items() <= tmpl["metadata"]["labels"].items()


def test_digest_wins_over_tag() -> None:
    digest = "sha256:" + "a" * 64
    assert container({"image": {"digest": digest}})["image"] == (
        f"{api.DEFAULT_IMAGE_REPOSITORY}@{digest}"
    )


def test_defaults() -> None:
    c = container({})
    assert c["image"] == "ghcr.io/lmcache-kube/vllm-lmcache:0.1.0"
    assert c["resources"]["requests"] == {
        "cpu": "4",
        "memory": "22Gi",  # 16Gi for vLLM, 1Gi of /dev/shm, the 5 GB pool
        "ephemeral-storage": "60Gi",  # 10Gi writable layer + the 50Gi model cache
        "nvidia.com/gpu": "1",
    }
    assert config({}) == {
        "chunk_size": 256,
        "local_cpu": True,
        "max_local_cpu_size": 5.0,
        "local_cpu_use_hugepages": False,
        "prefetch": False,
        "metrics_port": 9090,
    }
    svc = rendered({})[("Service", "demo")]
    assert svc["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in svc["spec"]["ports"]] == [8000, 9090]


def test_custom_gpu_resource_name_and_count() -> None:
    res = container({"resources": {"gpus": 2, "gpuResourceName": "amd.com/gpu"}})["resources"]
    assert res["limits"]["amd.com/gpu"] == "2"
    assert "nvidia.com/gpu" not in res["limits"]


def test_metrics_disabled_drops_port_and_config_key() -> None:
    spec = {"metrics": {"enabled": False}}
    assert "metrics_port" not in config(spec)
    assert [p["name"] for p in container(spec)["ports"]] == ["http"]


# --- local disk -----------------------------------------------------------------------------


def test_local_disk_emptydir_with_headroom_and_config() -> None:
    spec = {"lmcache": {"localDisk": {"enabled": True, "size": 100}}}
    vols = {v["name"]: v for v in pod(spec)["volumes"]}
    assert vols["lmcache-disk"]["emptyDir"]["sizeLimit"] == "110Gi"  # 100 GiB + 10%, canonical
    assert config(spec)["local_disk"] == "/var/cache/lmcache"
    assert config(spec)["max_local_disk_size"] == 100


def test_local_disk_volume_holds_every_tp_rank() -> None:
    """Each TP rank runs its own disk tier of max_local_disk_size on the shared volume."""
    spec = {
        "lmcache": {"localDisk": {"enabled": True, "size": 100}},
        "vllm": {"tensorParallelSize": 2},
        "resources": {"gpus": 2},
    }
    vols = {v["name"]: v for v in pod(spec)["volumes"]}
    assert vols["lmcache-disk"]["emptyDir"]["sizeLimit"] == "220Gi"
    assert config(spec)["max_local_disk_size"] == 100


def test_local_disk_with_storage_class_is_a_per_pod_ephemeral_pvc() -> None:
    spec = {
        "lmcache": {
            "localDisk": {"enabled": True, "size": 50, "storageClassName": "nvme", "path": "/cache"}
        }
    }
    p = pod(spec)
    vol = next(v for v in p["volumes"] if v["name"] == "lmcache-disk")
    claim = vol["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["storageClassName"] == "nvme"
    assert claim["resources"]["requests"]["storage"] == "55Gi"
    mount = next(m for m in p["containers"][0]["volumeMounts"] if m["name"] == "lmcache-disk")
    assert mount["mountPath"] == "/cache"


# --- engine config, secrets and hashing -----------------------------------------------------


def test_typed_fields_and_extra_config_reach_config_yaml() -> None:
    cfg = config(
        {
            "lmcache": {
                "chunkSize": 512,
                "localCpu": False,
                "maxLocalCpuSize": 2.5,
                "prefetch": True,
                "hugepages": {"enabled": True},
                "extraConfig": {"save_unfull_chunk": False},
            }
        }
    )
    assert cfg["chunk_size"] == 512
    assert cfg["local_cpu"] is False
    assert cfg["max_local_cpu_size"] == 2.5
    assert cfg["prefetch"] is True
    assert cfg["local_cpu_use_hugepages"] is True
    assert cfg["save_unfull_chunk"] is False


def test_external_remote_credentials_only_via_secret_env() -> None:
    spec = {
        "remote": {
            "url": "rediss://cache.example:6380/2",
            "credentialsSecretRef": {"name": "redis-creds"},
        }
    }
    cfg = config(spec)
    assert cfg["remote_url"] == "rediss://cache.example:6380/2"
    env = env_of(container(spec))
    assert env["LMCACHE_REMOTE_PASSWORD"] == {
        "secretKeyRef": {"name": "redis-creds", "key": "password"}
    }
    assert env["LMCACHE_REMOTE_USERNAME"]["secretKeyRef"]["optional"] is True
    text = rendered(spec)[("ConfigMap", "demo-lmcache-config")]["data"]["config.yaml"]
    assert "password" not in text and "redis-creds" not in text


def test_hf_token_from_secret() -> None:
    env = env_of(container({"hfTokenSecretRef": {"name": "hf", "key": "tok"}}))
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "tok"}}


def test_user_env_is_appended_after_operator_env() -> None:
    c = container({"vllm": {"env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}]}})
    assert c["env"][0]["name"] == "LMCACHE_CONFIG_FILE"
    assert c["env"][-1] == {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}


def test_config_hash_is_stable_and_follows_config_changes() -> None:
    def digest(spec: dict[str, Any]) -> str:
        return bundle.render(parse({"model": "m", **spec}), OWNER, None).config_hash

    base = {"lmcache": {"chunkSize": 256, "extraConfig": {"b": 1, "a": 2}}}
    reordered = {"lmcache": {"extraConfig": {"a": 2, "b": 1}, "chunkSize": 256}}
    assert digest(base) == digest(reordered) == digest(base)
    assert digest({"lmcache": {"chunkSize": 512}}) != digest({})
    # Fields that do not reach config.yaml do not roll pods through the hash.
    assert digest({"replicas": 3}) == digest({})


# --- Valkey ---------------------------------------------------------------------------------


def test_valkey_children_and_remote_url() -> None:
    objs = rendered({"valkey": {"enabled": True}})
    assert set(objs) >= {
        ("ConfigMap", "demo-valkey-config"),
        ("Service", "demo-valkey-headless"),
        ("Service", "demo-valkey"),
        ("StatefulSet", "demo-valkey"),
        ("NetworkPolicy", "demo-valkey"),
    }
    assert config({"valkey": {"enabled": True}})["remote_url"] == (
        "valkey://demo-valkey.ml.svc:6379"
    )
    assert objs[("Service", "demo-valkey-headless")]["spec"]["clusterIP"] == "None"
    assert objs[("StatefulSet", "demo-valkey")]["spec"]["serviceName"] == "demo-valkey-headless"


def test_valkey_evicts_with_allkeys_lru_under_maxmemory() -> None:
    conf = valkey.valkey_conf(
        parse({"model": "m", "valkey": {"enabled": True, "maxMemory": "2Gi"}})
    )
    assert "maxmemory 2147483648" in conf
    assert "maxmemory-policy allkeys-lru" in conf


def test_valkey_password_secret_and_wiring() -> None:
    spec = parse({"model": "m", "valkey": {"enabled": True}})
    secret = valkey.password_secret(spec, OWNER, "s3cret")
    assert base64.b64decode(secret["data"]["password"]) == b"s3cret"
    objs = rendered({"valkey": {"enabled": True}}, secret_hash="h1")
    # The generated Secret is created once by the reconciler, never applied with the rest.
    assert ("Secret", "demo-valkey-auth") not in objs
    ref = {"secretKeyRef": {"name": "demo-valkey-auth", "key": "password"}}
    assert env_of(container({"valkey": {"enabled": True}}))["LMCACHE_REMOTE_PASSWORD"] == ref
    server = objs[("StatefulSet", "demo-valkey")]["spec"]["template"]["spec"]["containers"][0]
    assert env_of(server)["VALKEY_PASSWORD"] == ref
    # The password never appears on a command line or in a ConfigMap.
    assert "s3cret" not in json.dumps(server)
    assert (
        "include /run/valkey/auth.conf"
        in objs[("ConfigMap", "demo-valkey-config")]["data"]["valkey.conf"]
    )


def test_valkey_existing_secret_and_no_auth() -> None:
    objs = rendered({"valkey": {"enabled": True, "auth": {"existingSecret": "mine"}}})
    assert ("Secret", "demo-valkey-auth") not in objs
    env = env_of(container({"valkey": {"enabled": True, "auth": {"existingSecret": "mine"}}}))
    assert env["LMCACHE_REMOTE_PASSWORD"]["secretKeyRef"]["name"] == "mine"
    open_spec = {"valkey": {"enabled": True, "auth": {"enabled": False}}}
    assert "LMCACHE_REMOTE_PASSWORD" not in env_of(container(open_spec))
    server = rendered(open_spec)[("StatefulSet", "demo-valkey")]
    assert server["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "valkey-server",
        "/etc/valkey/valkey.conf",
    ]


def test_valkey_memory_headroom_and_persistence() -> None:
    spec = parse({"model": "m", "valkey": {"enabled": True, "maxMemory": "4Gi"}})
    assert valkey.memory_limit(spec) == "5376Mi"  # 4Gi × 1.25 + 256Mi
    persisted = {
        "valkey": {
            "enabled": True,
            "maxMemory": "4Gi",
            "persistence": {"enabled": True, "size": "20Gi", "storageClassName": "ssd"},
        }
    }
    assert valkey.memory_limit(parse({"model": "m", **persisted})) == "8448Mi"  # ×2 + 256Mi
    sts = rendered(persisted)[("StatefulSet", "demo-valkey")]["spec"]
    claim = sts["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["spec"]["storageClassName"] == "ssd"
    assert sts["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Delete"
    explicit = parse({"model": "m", "valkey": {"enabled": True, "resources": {"memory": "6Gi"}}})
    assert valkey.memory_limit(explicit) == "6Gi"


def test_network_policy_admits_only_this_deployments_vllm_pods() -> None:
    np = rendered({"valkey": {"enabled": True}})[("NetworkPolicy", "demo-valkey")]["spec"]
    assert np["podSelector"]["matchLabels"] == {
        api.LABEL_INSTANCE: "demo",
        api.LABEL_COMPONENT: "valkey",
    }
    assert np["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {api.LABEL_INSTANCE: "demo", api.LABEL_COMPONENT: "vllm"}}}
    ]


def test_every_child_is_owned_and_labelled() -> None:
    spec = {"model": "m", "valkey": {"enabled": True}, "kvEvents": {"enabled": True}}
    for m in bundle.render(parse(spec), OWNER, "h").manifests:
        meta = m["metadata"]
        assert meta["namespace"] == "ml"
        assert meta["labels"][api.LABEL_MANAGED_BY] == "lmcache-operator"
        assert meta["labels"][api.LABEL_PART_OF] == "lmcache-kube"
        ref = meta["ownerReferences"][0]
        assert (ref["kind"], ref["uid"], ref["controller"]) == (api.KIND, "uid-demo", True)


def test_apply_order_puts_config_before_workloads() -> None:
    kinds = [
        m["kind"]
        for m in bundle.render(parse({"model": "m", "valkey": {"enabled": True}}), OWNER).manifests
    ]
    assert kinds.index("ConfigMap") < kinds.index("StatefulSet") < kinds.index("Deployment")


def test_remote_url_for_valkey_uses_the_client_service() -> None:
    assert engine_config.valkey_host(OWNER) == "demo-valkey.ml.svc"


# --- production pods: Pod Security, disk, startup, rollout, events ----------------------------


def test_vllm_pod_meets_the_restricted_pod_security_profile() -> None:
    p = pod({"lmcache": {"hugepages": {"enabled": True}}})
    sc = p["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == sc["runAsGroup"] == sc["fsGroup"] == vllm.VLLM_UID != 0
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert p["automountServiceAccountToken"] is False
    csc = p["containers"][0]["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    # Only volume types the restricted profile allows.
    allowed = {"configMap", "emptyDir", "projected", "ephemeral", "persistentVolumeClaim"}
    for v in p["volumes"]:
        assert set(v) - {"name"} <= allowed, v


def test_valkey_pod_meets_the_restricted_pod_security_profile() -> None:
    sts = rendered({"valkey": {"enabled": True}})[("StatefulSet", "demo-valkey")]
    p = sts["spec"]["template"]["spec"]
    assert p["securityContext"]["runAsNonRoot"] is True
    assert p["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert p["automountServiceAccountToken"] is False
    csc = p["containers"][0]["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}


def volumes_by_name(spec: dict[str, Any]) -> dict[str, Any]:
    return {v["name"]: v for v in pod(spec)["volumes"]}


def test_model_cache_is_hf_home_and_disk_emptydirs_are_requested() -> None:
    c = container({"lmcache": {"localDisk": {"enabled": True, "size": 100}}})
    assert env_of(c)["HF_HOME"] == "/var/cache/huggingface"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "model-cache")
    assert mount["mountPath"] == "/var/cache/huggingface"
    # 10Gi writable layer + 50Gi model cache + 110Gi disk tier (100 GB + 10%)
    assert c["resources"]["requests"]["ephemeral-storage"] == "170Gi"
    assert "ephemeral-storage" not in c["resources"]["limits"]  # a request, never an eviction
    vols = volumes_by_name({"lmcache": {"localDisk": {"enabled": True, "size": 100}}})
    assert vols["model-cache"]["emptyDir"] == {"sizeLimit": "50Gi"}


def test_pvc_backed_volumes_are_not_node_disk() -> None:
    spec = {
        "modelCache": {"storageClassName": "fast", "size": "200Gi"},
        "lmcache": {"localDisk": {"enabled": True, "size": 100, "storageClassName": "nvme"}},
        "resources": {"ephemeralStorage": "20Gi"},
    }
    c = container(spec)
    assert c["resources"]["requests"]["ephemeral-storage"] == "20Gi"
    claim = volumes_by_name(spec)["model-cache"]["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert (claim["storageClassName"], claim["resources"]["requests"]["storage"]) == (
        "fast",
        "200Gi",
    )


def test_model_cache_from_an_existing_shared_claim() -> None:
    spec = {"modelCache": {"claimName": "models", "readOnly": True, "path": "/models"}}
    assert volumes_by_name(spec)["model-cache"]["persistentVolumeClaim"] == {
        "claimName": "models",
        "readOnly": True,
    }
    c = container(spec)
    mount = next(m for m in c["volumeMounts"] if m["name"] == "model-cache")
    assert mount == {"name": "model-cache", "mountPath": "/models", "readOnly": True}
    assert env_of(c)["HF_HOME"] == "/models"
    assert c["resources"]["requests"]["ephemeral-storage"] == "10Gi"


def test_extra_volumes_and_mounts_pass_through() -> None:
    spec = {
        "volumes": [{"name": "weights", "persistentVolumeClaim": {"claimName": "llama"}}],
        "volumeMounts": [{"name": "weights", "mountPath": "/weights", "readOnly": True}],
    }
    assert volumes_by_name(spec)["weights"] == spec["volumes"][0]
    assert spec["volumeMounts"][0] in container(spec)["volumeMounts"]


@pytest.mark.parametrize(
    ("timeout", "failures", "deadline"), [(1800, 180, 2400), (7200, 720, 7800)]
)
def test_progress_deadline_covers_the_startup_budget(
    timeout: int, failures: int, deadline: int
) -> None:
    """A model still downloading is Progressing, not Degraded: the Deployment's deadline
    outlasts the startup probe's budget (plus scheduling and the image pull)."""
    dep = rendered({"vllm": {"startupTimeoutSeconds": timeout}})[("Deployment", "demo")]
    probe = dep["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] == failures * 10 >= timeout
    assert dep["spec"]["progressDeadlineSeconds"] == deadline > failures * 10


def test_rollout_strategy_is_exposed() -> None:
    default = rendered({})[("Deployment", "demo")]["spec"]["strategy"]
    assert default == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
    }
    surge = {"strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}}
    assert rendered(surge)[("Deployment", "demo")]["spec"]["strategy"]["rollingUpdate"] == {
        "maxSurge": 1,
        "maxUnavailable": 0,
    }
    recreate = rendered({"strategy": {"type": "Recreate"}})[("Deployment", "demo")]
    assert recreate["spec"]["strategy"] == {"type": "Recreate"}


def test_one_metrics_port_per_pod_whatever_the_tensor_parallelism() -> None:
    """Every TP rank's engine writes its metrics into one prometheus-client multiprocess
    directory, and rank 0 serves them all on metrics_port: one scrape per pod."""
    spec = {"vllm": {"tensorParallelSize": 4}}
    c = container(spec)
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [
        ("http", 8000),
        ("lmcache-metrics", 9090),
    ]
    assert config(spec)["metrics_port"] == 9090
    assert env_of(c)["PROMETHEUS_MULTIPROC_DIR"] == api.METRICS_DIR
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == api.METRICS_DIR)
    volume = volumes_by_name(spec)[mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"  # fresh for every pod, as it must be
    assert "PROMETHEUS_MULTIPROC_DIR" not in env_of(container({"metrics": {"enabled": False}}))


def test_kv_events_publisher_per_pod_and_headless_service() -> None:
    spec = {"kvEvents": {"enabled": True, "port": 5600, "topic": "kv"}}
    c = container(spec)
    flag = next(a for a in c["args"] if a.startswith("--kv-events-config="))
    assert json.loads(flag.split("=", 1)[1]) == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:5600",
        "topic": "kv",
    }
    assert {"name": "kv-events", "containerPort": 5600, "protocol": "TCP"} in c["ports"]
    svc = rendered(spec)[("Service", "demo-kv-events")]["spec"]
    assert svc["clusterIP"] == "None"
    assert svc["ports"] == [
        {"name": "kv-events", "port": 5600, "targetPort": "kv-events", "protocol": "TCP"}
    ]
    assert svc["selector"] == {api.LABEL_INSTANCE: "demo", api.LABEL_COMPONENT: "vllm"}
    assert ("Service", "demo-kv-events") not in rendered({})
    assert not any(a.startswith("--kv-events-config") for a in container({})["args"])


def test_kv_events_config_matches_vllms_own_fields() -> None:
    """vLLM parses the flag into KVEventsConfig; unknown keys would be refused at start."""
    kv_events = pytest.importorskip("vllm.config.kv_events", reason="vLLM is not installed")
    spec = parse({"model": "m", "kvEvents": {"enabled": True}})
    config_ = kv_events.KVEventsConfig(**json.loads(vllm.kv_events_config(spec)))
    assert config_.enable_kv_cache_events and config_.publisher == "zmq"
    kv_transfer = pytest.importorskip("vllm.config.kv_transfer")
    transfer = kv_transfer.KVTransferConfig(**json.loads(vllm.KV_TRANSFER_CONFIG))
    assert transfer.kv_load_failure_policy == "recompute"


def test_secret_hash_lands_on_both_pod_templates() -> None:
    objs = rendered({"valkey": {"enabled": True}}, secret_hash="abc")
    for key in (("Deployment", "demo"), ("StatefulSet", "demo-valkey")):
        annotations = objs[key]["spec"]["template"]["metadata"]["annotations"]
        assert annotations[api.ANNOTATION_SECRET_HASH] == "abc"
    plain = rendered({})[("Deployment", "demo")]["spec"]["template"]["metadata"]["annotations"]
    assert api.ANNOTATION_SECRET_HASH not in plain
