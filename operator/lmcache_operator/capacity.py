"""Could pods of this deployment be scheduled, and how many? (`Schedulable`, `status.sizing`)

Evaluates what the scheduler's filters would for one pod: a schedulable node, taints the pod
tolerates, `nodeSelector`, required node affinity, and every resource the pod requests
against the node's allocatable capacity. Allocatable, not free: the question is whether the
cluster can ever run the pod (what a user gets wrong when no node reserves hugepages or a
taint is not tolerated), so the replica count is an upper bound that ignores other pods.

Nodes are parsed once per watch event (`Node.of`), not per reconcile: with a thousand nodes
a reconcile only compares integers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmcache_operator import quantity
from lmcache_operator.render import vllm
from lmcache_operator.spec import Spec

HUGEPAGES = "hugepages-2Mi"
_UNITS = {"cpu": 1000}  # compared in millicores; everything else in its own unit


@dataclass(frozen=True)
class Node:
    """What the scheduler's filters read from a Node, parsed once."""

    name: str
    labels: Mapping[str, str]
    taints: tuple[Mapping[str, Any], ...]
    unschedulable: bool
    allocatable: Mapping[str, int]

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Node:
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        allocatable = {}
        for name, value in ((body.get("status") or {}).get("allocatable") or {}).items():
            try:
                allocatable[name] = int(quantity.parse(value) * _UNITS.get(name, 1))
            except quantity.QuantityError:
                continue  # a resource the scheduler could not use either
        return cls(
            name=meta.get("name", "?"),
            labels=dict(meta.get("labels") or {}),
            taints=tuple(spec.get("taints") or ()),
            unschedulable=bool(spec.get("unschedulable")),
            allocatable=allocatable,
        )


@dataclass(frozen=True)
class Verdict:
    fits: bool
    message: str
    eligible_nodes: int = 0
    max_replicas: int = 0


def pod_requests(spec: Spec) -> dict[str, int]:
    """What one vLLM pod's container requests (as rendered), in the units
    `Node.allocatable` uses."""
    requests = vllm.resources(spec)["requests"]
    need = {
        name: int(quantity.parse(value) * _UNITS.get(name, 1)) for name, value in requests.items()
    }
    need["pods"] = 1
    return need


def _tolerates(tolerations: Sequence[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if not t.get("key"):
            if t.get("operator") == "Exists":
                return True  # an empty key with Exists tolerates everything
            continue
        if t["key"] != taint.get("key"):
            continue
        if t.get("operator") == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


def _untolerated(node: Node, tolerations: Sequence[Mapping[str, Any]]) -> str | None:
    """The first taint that keeps the pod off the node (PreferNoSchedule only prefers)."""
    taints = list(node.taints)
    if node.unschedulable:
        taints.append({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"})
    for taint in taints:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(
            tolerations, taint
        ):
            return f"{taint.get('key')}={taint.get('value', '')}:{taint.get('effect')}"
    return None


def _expression(node: Node, expr: Mapping[str, Any], fields: bool) -> bool:
    key, op = expr.get("key", ""), expr.get("operator", "")
    values = [str(v) for v in expr.get("values") or []]
    actual = (node.name if key == "metadata.name" else None) if fields else node.labels.get(key)
    if op == "In":
        return actual is not None and actual in values
    if op == "NotIn":
        return actual is None or actual not in values
    if op == "Exists":
        return actual is not None
    if op == "DoesNotExist":
        return actual is None
    if op in ("Gt", "Lt") and actual is not None and values:
        try:
            a, b = int(actual), int(values[0])
        except ValueError:
            return False
        return a > b if op == "Gt" else a < b
    return False


def _affinity_matches(node: Node, affinity: Mapping[str, Any]) -> bool:
    """Required node affinity: any term matches when all of its expressions do."""
    required = (affinity.get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )
    if not required:
        return True
    for term in required.get("nodeSelectorTerms") or []:
        exprs = term.get("matchExpressions") or []
        fields = term.get("matchFields") or []
        if not exprs and not fields:
            continue  # an empty term matches nothing
        if all(_expression(node, e, False) for e in exprs) and all(
            _expression(node, f, True) for f in fields
        ):
            return True
    return False


def _placement_excludes(node: Node, spec: Spec) -> str | None:
    place = spec.placement
    if not all(node.labels.get(k) == v for k, v in place.node_selector.items()):
        return "nodeSelector"
    if not _affinity_matches(node, place.affinity):
        return "node affinity"
    taint = _untolerated(node, place.tolerations)
    return f"untolerated taint {taint}" if taint else None


def _show(resource: str, amount: int) -> str:
    if resource == "cpu":
        return quantity.format_decimal(quantity.parse(f"{amount}m"))
    if resource in ("memory", "ephemeral-storage", HUGEPAGES):
        return quantity.format_binary(amount)
    return str(amount)


def check(spec: Spec, nodes: Iterable[Node]) -> Verdict:
    """Whether some node can host one pod, and how many pods all of them could hold."""
    need = pod_requests(spec)
    shown = ", ".join(f"{r} {_show(r, n)}" for r, n in need.items() if r != "pods")
    eligible = total = 0
    excluded: dict[str, int] = {}
    closest: tuple[int, str, str] | None = None  # (resources short, node, what is short)
    first_fit = None
    for node in nodes:
        if reason := _placement_excludes(node, spec):
            excluded[reason] = excluded.get(reason, 0) + 1
            continue
        eligible += 1
        short = [r for r, n in need.items() if node.allocatable.get(r, 0) < n]
        if not short:
            total += min(node.allocatable.get(r, 0) // n for r, n in need.items() if n)
            first_fit = first_fit or node.name
        elif closest is None or len(short) < closest[0]:
            detail = ", ".join(
                f"{r} {_show(r, node.allocatable.get(r, 0))} < {_show(r, need[r])}" for r in short
            )
            closest = (len(short), node.name, detail)
    if first_fit:
        return Verdict(
            True,
            f"node {first_fit} can host a pod requesting {shown}; "
            f"{eligible} eligible nodes could hold {total} such pods in all",
            eligible,
            total,
        )
    if closest is None:
        why = "; ".join(f"{n} excluded by {r}" for r, n in sorted(excluded.items()))
        return Verdict(False, f"no node is eligible for a pod ({why or 'no nodes'})")
    return Verdict(
        False,
        f"no node can host a pod requesting {shown}; the closest, {closest[1]}, offers "
        f"{closest[2]}",
        eligible,
        0,
    )
