import pytest

from tests.operator.fakes import FakeCluster, node


@pytest.fixture
def cluster() -> FakeCluster:
    """A cluster with one node big enough for the examples (8 GPUs, 40Gi of hugepages)."""
    return FakeCluster(nodes=[node("gpu-1", gpus=8, hugepages="40Gi")])
