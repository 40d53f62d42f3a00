"""`make demo-k8s`: the Kubernetes side on this machine, as a user would see it.

Brings up the local cluster with its real node (or reuses a running `make e2e-up` cluster),
`helm install`s the chart with the operator image built here, applies the Valkey example shrunk
to this machine, and shows `kubectl get lmcd`, the pods, and a KV round trip between two engine
pods through Valkey with the engine's own log lines. The engine pods run the stand-in for
`vllm serve` (e2e/standin/vllm_serve.py): vLLM cannot serve a model on a CPU-only machine.
The cluster stays up afterwards; `make e2e-down` stops it.
"""

from __future__ import annotations

import random
import sys
import time
from typing import Any

import yaml

from e2e import cluster, lmcd, node, realpods
from e2e.kube import Cluster, Kube, wait_for
from e2e.operator_proc import install_chart

EXAMPLE = cluster.REPO / "examples" / "lmcachedeployment-valkey.yaml"
NAMESPACE = "lmcache-demo"
RELEASE = "lmcache"
RELEASE_NAMESPACE = "lmcache-system"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(kube: Cluster, *args: str) -> None:
    print(f"$ kubectl {' '.join(args)}")
    print(kube.kubectl(*args).rstrip(), flush=True)


def shrunk_example(images: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The example as it is, with what a 2-core machine without GPUs or registry needs changed."""
    (doc,) = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    changes = realpods.engine_spec(images, replicas=2)
    # No persistence: the local cluster's hostPath provisioner makes root-owned volumes, which
    # Valkey (UID 999) cannot write its snapshots to.
    changes["valkey"] = {
        "image": images["valkey"],
        "maxMemory": "32Mi",
        "resources": {"cpu": "100m"},
        "persistence": {"enabled": False},
    }
    spec = doc["spec"]
    for key, value in changes.items():
        merge = isinstance(value, dict) and isinstance(spec.get(key), dict)
        spec[key] = {**spec[key], **value} if merge else value
    return doc, changes


def main() -> int:
    if cluster.running() is None:
        say("starting the local cluster with its real node (images are built the first time)")
        cluster.up()
    state = node.running()
    if state is None:
        print(f"no real node: {node.skipped_reason() or 'not running'}", file=sys.stderr)
        return 1
    kube = Cluster(cluster.KUBECONFIG, local=True)
    k8s = Kube(cluster.KUBECONFIG)

    say(f"helm install {RELEASE} charts/lmcache-operator (image {state.images['operator']})")
    install_chart(kube, k8s, RELEASE, RELEASE_NAMESPACE, realpods.chart_values(state.images))
    show(kube, "get", "pods", "-n", RELEASE_NAMESPACE, "-o", "wide")

    say(f"kubectl apply -f {EXAMPLE.relative_to(cluster.REPO)}, shrunk to this machine")
    doc, changes = shrunk_example(state.images)
    print(yaml.safe_dump({"changed": changes}, sort_keys=False).rstrip())
    if k8s.get("v1", "Namespace", NAMESPACE) is None:
        k8s.create(realpods.namespace(NAMESPACE))
        wait_for(
            "the namespace's ServiceAccount",
            lambda: k8s.get("v1", "ServiceAccount", "default", NAMESPACE),
        )
    name = doc["metadata"]["name"]
    k8s.apply(doc, NAMESPACE)
    started = time.monotonic()
    lmcd.wait_ready(k8s, name, NAMESPACE, timeout=300)
    print(f"Ready after {time.monotonic() - started:.0f} s")
    show(kube, "get", "lmcd", "-n", NAMESPACE)
    show(kube, "get", "pods", "-n", NAMESPACE, "-o", "wide")

    say("a KV round trip: a prompt to one engine pod, then the same prompt to the other")
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/component=vllm"
    pods = sorted(
        (
            p
            for p in k8s.items("v1", "Pod", NAMESPACE, selector)
            if not p["metadata"].get("deletionTimestamp")
        ),
        key=lambda p: p["metadata"]["name"],
    )[:2]
    tokens = [random.randrange(3, 32000) for _ in range(2000)]
    for pod in pods:
        out = realpods.complete(pod["status"]["podIP"], tokens)
        print(
            f"POST /v1/completions to {pod['metadata']['name']}: {len(tokens)} prompt tokens, "
            f"cached_tokens={realpods.cached_tokens(out)}"
        )
    for pod in pods:
        pod_name = pod["metadata"]["name"]
        print(f"$ kubectl logs -n {NAMESPACE} {pod_name} | grep LMCache")
        for line in realpods.lmcache_lines(kube.kubectl("logs", "-n", NAMESPACE, pod_name))[-2:]:
            print(f"  {line}")
    say("the cluster keeps running")
    print(f"export KUBECONFIG={cluster.KUBECONFIG}; make e2e-down stops it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
