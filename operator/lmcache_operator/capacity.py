"""Could one pod of this deployment fit on some node? (`HugepagesSchedulable`)

Checks allocatable capacity (what the kubelet offers), not what other pods already use:
the question is whether the cluster can ever run the pod, which is what a user gets wrong
when hugepages are not reserved on any node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lmcache_operator import quantity
from lmcache_operator.render import sizing
from lmcache_operator.spec import Spec

HUGEPAGES = "hugepages-2Mi"


@dataclass(frozen=True)
class Verdict:
    fits: bool
    message: str


def _matches(node: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = node.get("metadata", {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _allocatable(node: Mapping[str, Any], resource: str) -> int:
    value = (node.get("status", {}).get("allocatable") or {}).get(resource)
    return int(quantity.parse(value)) if value is not None else 0


def check(spec: Spec, nodes: Iterable[Mapping[str, Any]]) -> Verdict:
    """A node fits when it is schedulable, matches nodeSelector, and offers the GPUs and
    2 MiB hugepages one pod requests."""
    pages = sizing.hugepages_per_pod(spec) // sizing.HUGEPAGE_BYTES
    gpus = spec.gpus_per_pod
    gpu_name = spec.resources.gpu_resource_name
    need = f"{gpus} {gpu_name}"
    if pages:
        size = quantity.format_binary(pages * sizing.HUGEPAGE_BYTES)
        need += f" and {pages} {HUGEPAGES} pages ({size})"
    best: tuple[int, int, str] | None = None
    for node in nodes:
        if node.get("spec", {}).get("unschedulable") or not _matches(
            node, spec.placement.node_selector
        ):
            continue
        have_pages = _allocatable(node, HUGEPAGES) // sizing.HUGEPAGE_BYTES
        have_gpus = _allocatable(node, gpu_name)
        name = node.get("metadata", {}).get("name", "?")
        if have_pages >= pages and have_gpus >= gpus:
            return Verdict(True, f"node {name} can host a pod needing {need}")
        if best is None or (have_pages, have_gpus) > best[:2]:
            best = (have_pages, have_gpus, name)
    if best is None:
        return Verdict(False, f"no schedulable node matches nodeSelector; a pod needs {need}")
    return Verdict(
        False,
        f"no node can host a pod needing {need} per pod; the closest, {best[2]}, offers "
        f"{best[1]} {gpu_name} and {best[0]} {HUGEPAGES} pages",
    )
