"""`make bench-operator`: N LMCacheDeployments created at once on M fake nodes, on the local
control plane (default 1000 on 1000).

Reports the time until all are Ready, the API requests the operator issued (from the API
server's audit log, by the operator's ServiceAccount), and the operator's peak RSS against the
chart's memory limit. The time is put against a floor measured in the same run: the same number
of plain Deployments with the same pod shape, created directly, until all are Available; that is
what the control plane and kwok need anyway, so the ratio is the operator's own overhead. A
benchmark, not a test: no limits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from e2e import cluster as local
from e2e import lmcd
from e2e.kube import WRITE_VERBS, Cluster, Kube, Obj, audit_events, is_true, wait_for
from e2e.operator_proc import OperatorProcess, install_chart, uninstall_chart

PAUSE = "registry.k8s.io/pause:3.10"


def bench_nodes(count: int) -> list[local.NodeShape]:
    """`count` 8-GPU nodes, besides the harness's own shapes: the operator watches them all."""
    return [
        local.NodeShape(f"bench-gpu-{i}", 8, "64Gi", cpu="96", memory="1Ti", gpu_product=local.H100)
        for i in range(count)
    ]


def chart_memory_limit() -> int:
    """The operator container's memory limit in the chart's default values, in bytes."""
    values = yaml.safe_load((local.REPO / "charts/lmcache-operator/values.yaml").read_text())
    return lmcd.quantity_bytes(values["resources"]["limits"]["memory"])


def create_all(k8s: Kube, manifests: list[Obj], namespace: str) -> None:
    """Create everything at once: concurrent requests, as a GitOps sync would issue them."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda m: k8s.create(m, namespace), manifests))


def timed_until(what: str, done: Callable[[], bool], timeout: float, start: float) -> float:
    """Seconds from `start` until `done`; polled every 2 s (each poll lists every object, which
    at 1000 objects would otherwise load the API server the benchmark measures)."""
    wait_for(what, done, timeout, interval=2.0)
    return time.monotonic() - start


def new_namespace(k8s: Kube, name: str) -> str:
    k8s.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    wait_for(
        f"ServiceAccount default in {name}",
        lambda: k8s.get("v1", "ServiceAccount", "default", name),
    )
    return name


def drop_namespace(k8s: Kube, name: str, timeout: float) -> None:
    """Delete and wait until its pods are gone, so the next phase gets the GPUs back."""
    k8s.delete("v1", "Namespace", name)
    wait_for(f"namespace {name} gone", lambda: k8s.get("v1", "Namespace", name) is None, timeout)


def floor_seconds(k8s: Kube, count: int, timeout: float) -> float:
    """Plain Deployments, one 1-GPU pod each, until all Available: the control plane's share."""
    ns = new_namespace(k8s, "bench-floor")
    limits = {"nvidia.com/gpu": "1", "cpu": "4", "memory": "22Gi", "ephemeral-storage": "60Gi"}
    manifests = []
    for i in range(count):
        labels = {"app": f"floor-{i}"}
        pod = {
            "containers": [
                {
                    "name": "main",
                    "image": PAUSE,
                    "resources": {"requests": limits, "limits": limits},
                }
            ]
        }
        manifests.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": f"floor-{i}"},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": labels},
                    "template": {"metadata": {"labels": labels}, "spec": pod},
                },
            }
        )
    start = time.monotonic()
    create_all(k8s, manifests, ns)

    def all_available() -> bool:
        ds = k8s.items("apps/v1", "Deployment", ns)
        return len(ds) == count and all(is_true(d, "Available") for d in ds)

    seconds = timed_until(f"{count} plain Deployments Available", all_available, timeout, start)
    drop_namespace(k8s, ns, timeout)
    return seconds


def operator_run(
    kube: Cluster, k8s: Kube, operator: OperatorProcess, count: int, timeout: float
) -> dict[str, Any]:
    assert kube.audit_log is not None
    ns = new_namespace(k8s, "bench-operator")
    manifests = [lmcd.manifest(f"bench-{i}") for i in range(count)]
    rss_before = operator.rss_bytes()
    audit_start = len(audit_events(kube.audit_log))
    start = time.monotonic()
    create_all(k8s, manifests, ns)

    def all_ready() -> bool:
        crs = k8s.items(lmcd.API_VERSION, lmcd.KIND, ns)
        return len(crs) == count and all(lmcd.settled(cr) for cr in crs)

    seconds = timed_until(f"{count} LMCacheDeployments Ready", all_ready, timeout, start)
    events = [
        e
        for e in audit_events(kube.audit_log)[audit_start:]
        if e["user"]["username"] == operator.username
    ]
    by_verb = Counter(e["verb"] for e in events)
    by_resource = Counter(e["objectRef"].get("resource", "") for e in events)
    writes = sum(n for verb, n in by_verb.items() if verb in WRITE_VERBS)
    result = {
        "seconds_to_all_ready": round(seconds, 2),
        "api_requests": len(events),
        "api_requests_per_deployment": round(len(events) / count, 2),
        "api_writes": writes,
        "api_requests_by_verb": dict(sorted(by_verb.items())),
        "api_requests_by_resource": dict(sorted(by_resource.items())),
        "operator_rss_before_bytes": rss_before,
        "operator_peak_rss_bytes": operator.peak_rss_bytes(),
    }
    drop_namespace(k8s, ns, timeout)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="LMCacheDeployments (default 1000)")
    parser.add_argument("--nodes", type=int, default=1000, help="fake 8-GPU nodes (default 1000)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per phase")
    parser.add_argument("--out", type=Path, default=Path(".bench/operator.json"))
    args = parser.parse_args(argv)

    with local.session() as kubeconfig:
        kube = Cluster(kubeconfig, local=True)
        k8s = Kube(kubeconfig)
        existing = {n["metadata"]["name"] for n in k8s.items("v1", "Node")}
        local.add_nodes(
            [s for s in bench_nodes(args.nodes) if s.name not in existing], timeout=args.timeout
        )
        nodes = len(k8s.items("v1", "Node"))
        floor = floor_seconds(k8s, args.count, args.timeout)
        release = install_chart(kube, k8s)
        operator = OperatorProcess(kube, release.namespace, release.deployment)
        operator.start()
        try:
            result = operator_run(kube, k8s, operator, args.count, args.timeout)
        finally:
            operator.stop()
            uninstall_chart(kube, release)

    limit = chart_memory_limit()
    report = {
        "benchmark": "operator",
        "deployments": args.count,
        "nodes": nodes,
        **result,
        "chart_memory_limit_bytes": limit,
        "peak_rss_to_memory_limit": round(result["operator_peak_rss_bytes"] / limit, 3),
        "floor_plain_deployments_seconds": round(floor, 2),
        "ratio_to_floor": round(result["seconds_to_all_ready"] / floor, 2),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    mib = 1 << 20
    print(
        f"{args.count} LMCacheDeployments Ready in {result['seconds_to_all_ready']:.1f} s "
        f"(plain Deployments floor {floor:.1f} s, ratio {report['ratio_to_floor']:.2f}); "
        f"{result['api_requests']} API requests "
        f"({result['api_requests_per_deployment']}/deployment, "
        f"{result['api_writes']} writes); operator peak RSS "
        f"{result['operator_peak_rss_bytes'] / mib:.0f} MiB of the chart's "
        f"{limit / mib:.0f} MiB limit ({report['peak_rss_to_memory_limit']:.0%}); {nodes} nodes"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
