"""What the scheduler's filters would decide for one pod, from parsed nodes (pure)."""

from __future__ import annotations

from typing import Any

import pytest
from lmcache_operator import capacity
from lmcache_operator.spec import parse

from tests.operator.fakes import node


def verdict(spec: dict[str, Any], *nodes: dict[str, Any]) -> capacity.Verdict:
    return capacity.check(parse({"model": "m", **spec}), [capacity.Node.of(n) for n in nodes])


GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def test_a_taint_keeps_the_pod_off_unless_tolerated() -> None:
    tainted = node("gpu", taints=[GPU_TAINT])
    refused = verdict({}, tainted)
    assert not refused.fits
    assert "untolerated taint nvidia.com/gpu=present:NoSchedule" in refused.message
    for toleration in (
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present"},
        {"operator": "Exists"},
    ):
        assert verdict({"tolerations": [toleration]}, tainted).fits, toleration
    wrong_value = {"key": "nvidia.com/gpu", "operator": "Equal", "value": "other"}
    assert not verdict({"tolerations": [wrong_value]}, tainted).fits


def test_prefer_no_schedule_only_prefers() -> None:
    soft = {"key": "spot", "value": "true", "effect": "PreferNoSchedule"}
    assert verdict({}, node("n", taints=[soft])).fits


def test_cordoned_nodes_are_skipped() -> None:
    assert not verdict({}, node("n", unschedulable=True)).fits


@pytest.mark.parametrize(
    ("expression", "fits"),
    [
        ({"key": "gpu.product", "operator": "In", "values": ["H100", "H200"]}, True),
        ({"key": "gpu.product", "operator": "NotIn", "values": ["H100"]}, False),
        ({"key": "gpu.product", "operator": "Exists"}, True),
        ({"key": "zone", "operator": "DoesNotExist"}, True),
        ({"key": "gpu.count", "operator": "Gt", "values": ["4"]}, True),
        ({"key": "gpu.count", "operator": "Lt", "values": ["4"]}, False),
    ],
)
def test_required_node_affinity(expression: dict[str, Any], fits: bool) -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [expression]}]
            }
        }
    }
    n = node("n", labels={"gpu.product": "H100", "gpu.count": "8"})
    assert verdict({"affinity": affinity}, n).fits is fits


def test_affinity_terms_are_ored_and_match_fields_name_nodes() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["x"]}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["b"]}]},
                ]
            }
        }
    }
    result = verdict({"affinity": affinity}, node("a"), node("b"))
    assert result.fits and "node b" in result.message
    assert result.eligible_nodes == 1


def test_every_requested_resource_counts() -> None:
    """Not only GPUs and hugepages: memory (with the pool), disk and CPU decide too."""
    small_disk = node("n", disk="20Gi")
    result = verdict({}, small_disk)
    assert not result.fits and "ephemeral-storage 20Gi < 60Gi" in result.message
    assert verdict({"modelCache": {"storageClassName": "fast"}}, small_disk).fits


def test_max_replicas_is_the_sum_over_eligible_nodes() -> None:
    nodes = [node("a", gpus=8), node("b", gpus=2), node("c", gpus=8, labels={"pool": "x"})]
    result = verdict({"nodeSelector": {}}, *nodes)
    assert (result.eligible_nodes, result.max_replicas) == (3, 18)
    result = verdict({"vllm": {"tensorParallelSize": 4}}, *nodes)
    assert result.max_replicas == 4  # 2 + 0 + 2: four-GPU pods


def test_no_eligible_node_says_what_excluded_them() -> None:
    result = verdict({"nodeSelector": {"pool": "gpu"}}, node("a"), node("b"))
    assert not result.fits
    assert "2 excluded by nodeSelector" in result.message
