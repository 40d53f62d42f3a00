"""Real pods on the real node (e2e/node.py), from the images built here (e2e/images.py): the
chart's operator as a pod, and an LMCacheDeployment's engine and Valkey pods, as a user's cluster
runs them.

The engine pods run a stand-in for `vllm serve` (e2e/standin/vllm_serve.py) because vLLM cannot
serve a model on this CPU-only machine: it steps vLLM's own Scheduler and its KV connector
lifecycle with CPU KV tensors, so our engine is loaded and driven through vLLM's built-in
`LMCacheConnectorV1` (its `LMCacheConnectorV1Impl`) as under `vllm serve`.

These tests run before the others (e2e/conftest.py): their operator is a pod of its own Helm
release, which is uninstalled before the session's local operator process starts (both watch
every namespace).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from e2e import lmcd, node, realpods
from e2e.cluster import BIN
from e2e.kube import WRITE_VERBS, Cluster, Kube, Obj, audit_events, is_true, wait_for
from e2e.operator_proc import Release, install_chart

# Starting engine pods (torch, vLLM) takes tens of seconds on these 2 shared cores.
pytestmark = [pytest.mark.real_node, pytest.mark.timeout(900)]

POD_RELEASE = "lmcache-pods"
MIB = 1 << 20
GIB = 1 << 30


@pytest.fixture(scope="module")
def real_node(kube: Cluster) -> node.NodeState:
    if not kube.local:
        pytest.skip("needs the local cluster's real node: its images are built on this machine")
    state = node.running()
    if state is None:
        why = f"no real node in this cluster: {node.skipped_reason() or 'not running'}"
        if node.mode() == "on":  # E2E_REAL_NODE=1 (CI): a reused cluster without one fails
            pytest.fail(why)
        pytest.skip(why)
    node.import_images(state)  # again, if the kubelet collected one under disk pressure
    return state


@pytest.fixture(scope="module")
def pod_operator(kube: Cluster, k8s: Kube, real_node: node.NodeState) -> Iterator[Release]:
    """`helm install` with the operator image built here, its pod placed on the real node."""
    values = realpods.chart_values(real_node.images)
    try:
        yield install_chart(kube, k8s, POD_RELEASE, POD_RELEASE, values)
    finally:
        # Also after a failed install: a release left behind would fight every later test.
        kube.helm("uninstall", POD_RELEASE, "-n", POD_RELEASE, "--wait", check=False)
        k8s.delete("v1", "Namespace", POD_RELEASE)  # with the Lease the operator made there
        wait_for(
            f"namespace {POD_RELEASE} gone",
            lambda: k8s.get("v1", "Namespace", POD_RELEASE) is None,
            timeout=120,
        )


def real_namespace(k8s: Kube, base: str) -> str:
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    k8s.create(realpods.namespace(name))
    wait_for(
        f"ServiceAccount default in {name}",
        lambda: k8s.get("v1", "ServiceAccount", "default", name),
        30,
    )
    return name


def kubectl(kube: Cluster, namespace: str, *args: str, check: bool = True) -> str:
    return kube.kubectl("-n", namespace, *args, check=check)


def exec_in(kube: Cluster, namespace: str, pod: str, *cmd: str) -> str:
    return kubectl(
        kube, namespace, "exec", pod, "-c", pod_container(kube, namespace, pod), "--", *cmd
    )


def pod_container(kube: Cluster, namespace: str, pod: str) -> str:
    return kubectl(kube, namespace, "get", "pod", pod, "-o", "jsonpath={.spec.containers[0].name}")


# --- the operator as a pod ----------------------------------------------------------------------


def test_operator_runs_as_a_non_root_read_only_pod_and_reconciles(
    kube: Cluster, k8s: Kube, real_node: node.NodeState, pod_operator: Release
) -> None:
    (pod,) = k8s.items(
        "v1", "Pod", pod_operator.namespace, f"app.kubernetes.io/instance={POD_RELEASE}"
    )
    name = pod["metadata"]["name"]
    assert pod["spec"]["nodeName"] == node.NAME
    (status,) = pod["status"]["containerStatuses"]
    assert status["ready"] and status["restartCount"] == 0, status
    assert status["image"] == real_node.images["operator"], status["image"]
    # The chart's securityContext, as the container really gets it.
    assert exec_in(kube, pod_operator.namespace, name, "id", "-u").strip() == "65532"
    touch = kube.kubectl(
        "-n",
        pod_operator.namespace,
        "exec",
        name,
        "--",
        "sh",
        "-c",
        "touch /probe 2>&1; echo rc=$?",
    )
    assert "Read-only file system" in touch and "rc=1" in touch, touch

    # It holds the leader Lease under its pod name, and reconciles a CR: from the pod's address.
    def leading() -> Obj | None:
        lease = k8s.get(
            "coordination.k8s.io/v1", "Lease", pod_operator.deployment, pod_operator.namespace
        )
        return lease if lease and lease["spec"].get("holderIdentity") == name else None

    wait_for(f"the leader Lease held by {name}", leading, timeout=60)
    namespace = real_namespace(k8s, "operator-pod")
    try:
        spec = realpods.engine_spec(real_node.images, replicas=0)
        k8s.create(lmcd.manifest("probe", **spec), namespace)
        cr = lmcd.wait_observed(k8s, "probe", namespace, timeout=90)
        assert is_true(cr, "ConfigValid"), cr.get("status")
        user = f"system:serviceaccount:{pod_operator.namespace}:{pod['spec']['serviceAccountName']}"
        assert kube.audit_log is not None
        writes = [
            e
            for e in audit_events(kube.audit_log, user)
            if e["verb"] in WRITE_VERBS and e["objectRef"].get("namespace") == namespace
        ]
        assert writes, f"no writes by {user} in {namespace}"
        assert {e["sourceIPs"][0] for e in writes} == {pod["status"]["podIP"]}
    finally:
        k8s.delete("v1", "Namespace", namespace)


# --- an LMCacheDeployment with Valkey and hugepages ---------------------------------------------


@dataclass(frozen=True)
class Deployment:
    namespace: str
    name: str


@pytest.fixture(scope="module")
def shared(k8s: Kube, real_node: node.NodeState, pod_operator: Release) -> Iterator[Deployment]:
    """Two engine pods on hugepages sharing an authenticated in-cluster Valkey."""
    namespace = real_namespace(k8s, "real-kv")
    spec = realpods.engine_spec(
        real_node.images,
        replicas=2,
        lmcache={"hugepages": {"enabled": True}},
        valkey=realpods.valkey_spec(real_node.images),
    )
    k8s.create(lmcd.manifest("kv", **spec), namespace)
    try:
        lmcd.wait_ready(k8s, "kv", namespace, timeout=300)
        yield Deployment(namespace, "kv")
    finally:
        k8s.delete("v1", "Namespace", namespace)


def engine_pods(k8s: Kube, d: Deployment) -> list[Obj]:
    selector = f"app.kubernetes.io/instance={d.name},app.kubernetes.io/component=vllm"
    pods = [
        p
        for p in k8s.items("v1", "Pod", d.namespace, selector)
        if not p["metadata"].get("deletionTimestamp")
    ]
    return sorted(pods, key=lambda p: p["metadata"]["name"])


def valkey_pod(k8s: Kube, d: Deployment) -> Obj:
    pod = k8s.get("v1", "Pod", f"{d.name}-valkey-0", d.namespace)
    assert pod, "no Valkey pod"
    return pod


def prompt(tokens: int) -> list[int]:
    return [random.randrange(3, 32000) for _ in range(tokens)]


def valkey_cli(kube: Cluster, d: Deployment, *args: str, auth: bool = True) -> str:
    """valkey-cli in the Valkey pod, authenticated (or not) with the Secret the operator gave it."""
    unset = () if auth else ("env", "-u", "REDISCLI_AUTH", "-u", "VALKEYCLI_AUTH")
    return exec_in(
        kube, d.namespace, f"{d.name}-valkey-0", *unset, "valkey-cli", "--no-auth-warning", *args
    )


def test_engine_pods_read_their_config_and_share_kv_through_valkey(
    kube: Cluster, k8s: Kube, real_node: node.NodeState, shared: Deployment
) -> None:
    a, b = engine_pods(k8s, shared)
    for pod in (a, b):
        assert pod["spec"]["nodeName"] == node.NAME
        assert is_true(pod, "Ready")
        (status,) = pod["status"]["containerStatuses"]
        assert status["image"] == real_node.images["engine"], status["image"]
    ns, a_name = shared.namespace, a["metadata"]["name"]
    # The projected config at the path the operator renders, and the engine's view of it.
    rendered = lmcd.engine_config(k8s, shared.name, ns)
    mounted = exec_in(kube, ns, a_name, "sh", "-c", 'cat "$LMCACHE_CONFIG_FILE"')
    assert yaml.safe_load(mounted) == rendered
    effective = exec_in(kube, ns, a_name, "lmcache", "check-config")
    remote = next(line for line in effective.splitlines() if line.startswith("remote_url"))
    assert f"valkey://{shared.name}-valkey.{ns}.svc:6379" in remote, remote
    assert "/etc/lmcache/config.yaml" in remote, remote
    # Valkey took the Secret's password (its start script) and refuses anyone without it.
    assert "NOAUTH" in valkey_cli(kube, shared, "ping", auth=False)
    assert valkey_cli(kube, shared, "ping").strip() == "PONG"

    tokens = prompt(3 * 256 + 100)
    first = realpods.complete(a["status"]["podIP"], tokens)
    assert realpods.cached_tokens(first) == 0
    second = realpods.complete(b["status"]["podIP"], tokens)
    # Everything but the last token (vLLM computes it to sample) comes from Valkey, byte for byte:
    # each pod's "model" writes its own random KV, so equal blocks can only have been loaded.
    assert realpods.cached_tokens(second) == len(tokens) - 1
    assert second["kv_block_sha256"] == first["kv_block_sha256"]
    assert len(first["kv_block_sha256"]) == len(tokens) // realpods.BLOCK
    assert int(valkey_cli(kube, shared, "dbsize")) >= 4
    a_log = realpods.lmcache_lines(kubectl(kube, ns, "logs", a_name))
    b_log = realpods.lmcache_lines(kubectl(kube, ns, "logs", b["metadata"]["name"]))
    assert f"Storing KV cache for {len(tokens)} out of {len(tokens)} tokens" in "\n".join(a_log)
    hit = f"LMCache hit tokens: {len(tokens)}, need to load: {len(tokens) - 1}"
    assert hit in "\n".join(b_log), b_log


def test_valkey_evicts_under_maxmemory_instead_of_dying(
    kube: Cluster, k8s: Kube, shared: Deployment
) -> None:
    a, b = engine_pods(k8s, shared)
    restarts = valkey_pod(k8s, shared)["status"]["containerStatuses"][0]["restartCount"]
    maxmemory = int(valkey_cli(kube, shared, "config", "get", "maxmemory").split()[-1])
    assert maxmemory == 32 * MIB

    def evicted() -> int:
        stats = valkey_cli(kube, shared, "info", "stats")
        return int(re.search(r"evicted_keys:(\d+)", stats)[1])  # type: ignore[index]

    def fill() -> int | None:
        realpods.complete(a["status"]["podIP"], prompt(1024))  # 4 chunks of 1 MiB each
        return evicted() or None

    wait_for("Valkey evicting under maxmemory", fill, timeout=180)
    used = int(re.search(r"used_memory:(\d+)", valkey_cli(kube, shared, "info", "memory"))[1])  # type: ignore[index]
    assert used <= maxmemory * 1.05, (used, maxmemory)
    pod = valkey_pod(k8s, shared)
    assert pod["status"]["containerStatuses"][0]["restartCount"] == restarts
    assert is_true(pod, "Ready")
    # Still a working cache: a new prefix stored now is a hit on the other pod.
    tokens = prompt(600)
    realpods.complete(a["status"]["podIP"], tokens)
    assert (
        realpods.cached_tokens(realpods.complete(b["status"]["podIP"], tokens)) == len(tokens) - 1
    )


def pod_cgroup(pod: Obj, controller: str) -> Path:
    """The pod's cgroup on the node (cgroupfs driver, v1 hierarchy)."""
    uid = pod["metadata"]["uid"]
    found = list(Path(f"/sys/fs/cgroup/{controller}/kubepods").glob(f"**/pod{uid}"))
    assert len(found) == 1, f"pod {uid}: cgroup not found under /sys/fs/cgroup/{controller}"
    return found[0]


POOL = """
import os, signal, torch
from lmcache import KVSpec, LMCacheEngineConfig
from lmcache.memory.pool import MemoryPool
config = LMCacheEngineConfig.load()
spec = KVSpec(num_layers=4, num_kv_heads=4, head_size=64, dtype=torch.float16)
"""
MAP_POOL = (
    POOL
    + """
pool = MemoryPool(config, spec, hugepages_without_cuda=True)
usage = open("/sys/fs/cgroup/hugetlb/hugetlb.2MB.usage_in_bytes").read().strip()
print("hugepages", pool.hugepages, "capacity", pool.capacity, "usage", usage)
"""
)
# The pool mapped in a process of its own, as long as the container lives (the exec returns).
HOLD_POOL = (
    POOL
    + """
if os.fork() == 0:
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    pool = MemoryPool(config, spec, hugepages_without_cuda=True)
    signal.pause()
"""
)


def hugepages_free() -> int:
    meminfo = Path("/proc/meminfo").read_text()
    return int(re.search(r"HugePages_Free:\s+(\d+)", meminfo)[1])  # type: ignore[index]


def test_pool_maps_hugepages_within_the_pod_limit_and_fails_clearly_beyond(
    kube: Cluster, k8s: Kube, shared: Deployment
) -> None:
    """The pod's hugepage limit is enforced and the engine's pool maps its 2 MiB pages within it.
    On this CPU-only node the engine itself falls back to ordinary memory (hugepages are for
    CUDA hosts, docs); so the pool is built here as it is on a CUDA host, through the engine's
    own MemoryPool with its test switch, from the pod's own config."""
    a, _ = engine_pods(k8s, shared)
    ns, name = shared.namespace, a["metadata"]["name"]
    limit = lmcd.quantity_bytes(a["spec"]["containers"][0]["resources"]["limits"]["hugepages-2Mi"])
    assert limit == lmcd.hugepage_bytes(0.0625, 1) == 32 * 2 * MIB
    cgroup = pod_cgroup(a, "hugetlb")
    assert int((cgroup / "hugetlb.2MB.limit_in_bytes").read_text()) == limit
    mounts = exec_in(kube, ns, name, "cat", "/proc/mounts")
    assert re.search(r"^\S+ /dev/hugepages hugetlbfs .*pagesize=2M", mounts, re.M), mounts

    out = exec_in(kube, ns, name, "python3", "-c", MAP_POOL)
    assert f"hugepages True capacity {limit} usage {limit}" in out, out
    # One page more than the limit: the engine's clear error and an ordinary exit, no SIGBUS.
    over = f"LMCACHE_MAX_LOCAL_CPU_SIZE={(limit + 2 * MIB) / GIB!r}"
    cmd = [str(BIN / "kubectl"), f"--kubeconfig={kube.kubeconfig}", "-n", ns, "exec", name]
    failed = subprocess.run(
        [*cmd, "--", "env", over, "python3", "-c", MAP_POOL], capture_output=True, text=True
    )
    assert failed.returncode == 1, (failed.returncode, failed.stderr)
    assert "ConfigError" in failed.stderr and "hugepages-2Mi" in failed.stderr, failed.stderr
    assert "mmap failed" in failed.stderr, failed.stderr


def core_pid(kube: Cluster, namespace: str, pod: str) -> str:
    found = realpods.CORE_PID.findall(kubectl(kube, namespace, "logs", pod))
    assert found, f"{pod}: no 'engine core ready (pid N)' line in its log"
    return str(found[-1])


def ready(k8s: Kube, namespace: str, pod: str) -> bool:
    return is_true(k8s.get("v1", "Pod", pod, namespace), "Ready")


def test_readiness_follows_health_and_engines_ride_out_a_valkey_restart(
    kube: Cluster, k8s: Kube, shared: Deployment
) -> None:
    a, b = engine_pods(k8s, shared)
    ns, a_name = shared.namespace, a["metadata"]["name"]
    a_ip, b_ip = a["status"]["podIP"], b["status"]["podIP"]
    # A hung engine core fails /health: the pod leaves the Service's endpoints, then comes back
    # (before the liveness probe, 5 x 15 s, would restart it).
    restarts = a["status"]["containerStatuses"][0]["restartCount"]
    pid = core_pid(kube, ns, a_name)
    exec_in(kube, ns, a_name, "sh", "-c", f"kill -STOP {pid}")
    try:
        wait_for(f"{a_name} NotReady", lambda: not ready(k8s, ns, a_name), timeout=60)
        slices = k8s.items(
            "discovery.k8s.io/v1", "EndpointSlice", ns, f"kubernetes.io/service-name={shared.name}"
        )
        endpoint = next(e for s in slices for e in s["endpoints"] if a_ip in e["addresses"])
        assert endpoint["conditions"]["ready"] is False
        events = k8s.events(ns, "Pod", a_name)
        assert any("Readiness probe failed" in (e.get("message") or "") for e in events)
    finally:
        exec_in(kube, ns, a_name, "sh", "-c", f"kill -CONT {pid}")
    wait_for(f"{a_name} Ready again", lambda: ready(k8s, ns, a_name), timeout=60)
    pod = k8s.get("v1", "Pod", a_name, ns)
    assert pod and pod["status"]["containerStatuses"][0]["restartCount"] == restarts

    # Valkey hangs, then is killed and restarted by the kubelet. Meanwhile both engines keep
    # serving (their lookups give up at remote_timeout_ms, then the breaker skips the tier), and
    # once Valkey is back a prefix stored on one pod is a hit on the other again.
    valkey = valkey_pod(k8s, shared)
    status = valkey["status"]["containerStatuses"][0]
    valkey_pid = host_pid(status["containerID"])
    os.kill(valkey_pid, signal.SIGSTOP)
    try:

        def breaker_open() -> bool:
            for ip in (a_ip, b_ip):
                started = time.monotonic()
                assert realpods.cached_tokens(realpods.complete(ip, prompt(300))) == 0
                assert time.monotonic() - started < 5, "a request waited on the hung Valkey"
            return bool(
                re.search(
                    r"remote tier valkey://\S+ .*unavailable", kubectl(kube, ns, "logs", a_name)
                )
            )

        wait_for("the engine's breaker to skip the hung Valkey", breaker_open, timeout=60)
        assert ready(k8s, ns, a_name) and ready(k8s, ns, b["metadata"]["name"])
    finally:
        os.kill(valkey_pid, signal.SIGKILL)

    def valkey_restarted() -> bool:
        pod = valkey_pod(k8s, shared)
        restarts = pod["status"]["containerStatuses"][0]["restartCount"]
        return restarts == status["restartCount"] + 1 and is_true(pod, "Ready")

    wait_for("Valkey restarted by the kubelet and Ready", valkey_restarted, timeout=120)
    assert valkey_pod(k8s, shared)["metadata"]["uid"] == valkey["metadata"]["uid"]

    def hit_again() -> bool:
        tokens = prompt(300)
        realpods.complete(a_ip, tokens)
        return realpods.cached_tokens(realpods.complete(b_ip, tokens)) == len(tokens) - 1

    wait_for("a prefix stored on one pod hit on the other again", hit_again, timeout=90)
    log = kubectl(kube, ns, "logs", a_name)
    assert re.search(r"remote tier valkey://\S+ .*is back", log), (
        "no recovery line in the engine's log"
    )


def host_pid(container_id: str) -> int:
    """A container's main process as the node sees it (containerd's task list)."""
    cid = container_id.split("://", 1)[1]
    for line in node.ctr("tasks", "ls").splitlines()[1:]:
        task, pid, *_ = line.split()
        if task == cid:
            return int(pid)
    raise AssertionError(f"no containerd task for {cid}")


def test_config_change_rolls_out_pods_that_read_the_new_config(
    kube: Cluster, k8s: Kube, shared: Deployment
) -> None:
    ns = shared.namespace
    old_pods = {p["metadata"]["name"] for p in engine_pods(k8s, shared)}
    deployment = k8s.get("apps/v1", "Deployment", shared.name, ns)
    assert deployment
    old_hash = deployment["spec"]["template"]["metadata"]["annotations"][lmcd.CONFIG_HASH]
    patch = {"spec": {"lmcache": {"chunkSize": 128}}}
    kubectl(
        kube, ns, "patch", lmcd.KIND.lower(), shared.name, "--type=merge", "-p", json.dumps(patch)
    )
    lmcd.wait_ready(k8s, shared.name, ns, timeout=300)

    def rolled() -> list[Obj] | None:
        pods = engine_pods(k8s, shared)
        current = {p["metadata"]["name"] for p in pods}
        done = len(pods) == 2 and not current & old_pods and all(is_true(p, "Ready") for p in pods)
        return pods if done else None

    pods = wait_for("the old pods replaced by Ready new ones", rolled, timeout=300)
    selector = f"app.kubernetes.io/instance={shared.name},app.kubernetes.io/component=vllm"
    sets = k8s.items("apps/v1", "ReplicaSet", ns, selector)
    live = [r for r in sets if r["spec"]["replicas"]]
    assert len(live) == 1 and len(sets) == 2, [
        (r["metadata"]["name"], r["spec"]["replicas"]) for r in sets
    ]
    assert live[0]["spec"]["template"]["metadata"]["annotations"][lmcd.CONFIG_HASH] != old_hash
    for pod in pods:
        name = pod["metadata"]["name"]
        mounted = exec_in(kube, ns, name, "sh", "-c", 'cat "$LMCACHE_CONFIG_FILE"')
        assert "chunk_size: 128" in mounted, mounted
        assert "chunk size 128" in kubectl(kube, ns, "logs", name)


def test_deleting_the_cr_collects_everything_and_returns_the_hugepages(
    kube: Cluster, k8s: Kube, shared: Deployment
) -> None:
    ns = shared.namespace
    pods = [*engine_pods(k8s, shared), valkey_pod(k8s, shared)]
    cgroups = [pod_cgroup(p, "hugetlb") for p in pods]
    uids = [p["metadata"]["uid"] for p in pods]
    # An engine pod holds its pool on hugepages, as on a CUDA host (see the hugepage test).
    holder = pods[0]
    limit = lmcd.quantity_bytes(
        holder["spec"]["containers"][0]["resources"]["limits"]["hugepages-2Mi"]
    )
    exec_in(kube, ns, holder["metadata"]["name"], "python3", "-c", HOLD_POOL)
    usage = cgroups[0] / "hugetlb.2MB.usage_in_bytes"
    wait_for("the pool mapped on hugepages", lambda: int(usage.read_text()) == limit, timeout=60)
    free = hugepages_free()
    k8s.delete(lmcd.API_VERSION, lmcd.KIND, shared.name, ns)
    selector = f"app.kubernetes.io/instance={shared.name}"

    def collected() -> bool:
        kinds = [
            ("v1", "Pod"),
            ("apps/v1", "Deployment"),
            ("apps/v1", "StatefulSet"),
            ("v1", "Service"),
            ("v1", "ConfigMap"),
            ("v1", "Secret"),
        ]
        return not any(k8s.items(v, k, ns, selector) for v, k in kinds)

    wait_for("every child of the CR garbage-collected", collected, timeout=180)
    # The kubelet tore the pods down: their cgroups and hugetlbfs volumes are gone, so are the
    # hugepages they held, and the node has no hugepage request left on it.
    wait_for("the pods' cgroups removed", lambda: not any(c.exists() for c in cgroups), timeout=60)
    pages = limit // (2 * MIB)
    wait_for(
        f"{pages} hugepages back in the node's free pool",
        lambda: hugepages_free() >= free + pages,
        60,
    )
    mounts = Path("/proc/mounts").read_text()
    assert not [m for m in mounts.splitlines() if "hugetlbfs" in m and any(u in m for u in uids)]
    on_node = k8s.items("v1", "Pod")
    requested = [
        p["metadata"]["name"]
        for p in on_node
        if p["spec"].get("nodeName") == node.NAME
        and any(
            "hugepages-2Mi" in (c.get("resources") or {}).get("requests", {})
            for c in p["spec"]["containers"]
        )
    ]
    assert requested == []
