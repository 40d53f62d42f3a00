"""Chart tests: find the chart tool and helm, and decide what a missing helm means.

`make chart-check` (part of `make test`) sets CHART_REQUIRE_TOOLS=1 after building helm, so there a
missing tool fails the run; a bare `make unit` before `make e2e-tools` skips with the reason.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "charts" / "tools"))

import chartctl


def _require(what: str, path: Path | None) -> Path:
    if path is not None:
        return path
    reason = f"no {what}: run `make e2e-tools` (or set {what.upper()}=/path/to/{what})"
    if os.environ.get("CHART_REQUIRE_TOOLS"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def helm() -> Path:
    return _require("helm", chartctl.helm_binary())


@pytest.fixture(scope="session")
def kubectl() -> Path:
    return _require("kubectl", chartctl.kubectl_binary())
