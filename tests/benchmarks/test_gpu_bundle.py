"""The GPU bundle (``benchmarks/gpu/site.txt``) covers what ``vllm serve`` imports on the GPU.

That machine has no network: a module missing there costs a device call. Here, a child Python
(this venv, which has vLLM) imports the serving path with every top-level module hidden whose
distribution is neither in the machine's image (``device-packages.txt``) nor in ``site.txt``:
an emulation of the machine's packages (a mock, since the machine is not here), by hiding what
this venv has beyond them. CUDA libraries do not load here, so only missing modules count.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

GPU = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"
ROOT = GPU.parents[1]

# What the API server, the engine core and the workers import for a dense model with FlashAttention,
# the two KV connectors and the dummy loader, including the routers and backends loaded lazily.
SERVING_PACKAGES = [
    "vllm.entrypoints.cli",
    "vllm.entrypoints.serve",
    "vllm.entrypoints.openai",
    "vllm.v1.engine",
    "vllm.v1.core",
    "vllm.v1.worker",
    "vllm.v1.kv_offload",
    "vllm.v1.sample",
    "vllm.v1.structured_output",
    "vllm.v1.executor",
    "vllm.v1.metrics",
    "vllm.compilation",
    "vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector",
    "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector",
    "vllm.distributed.kv_transfer.kv_connector.factory",
    "vllm.v1.attention.backends.flash_attn",
    "vllm.model_executor.models.llama",
    "vllm.model_executor.model_loader.dummy_loader",
    "valkey",
]
# Features the benchmark does not use (other tokenizers, structured-output backends, connectors).
UNUSED = re.compile(
    r"vllm\.tokenizers\.mistral|backend_lm_format_enforcer|moriio|hf3fs|ray_executor|lmcache_mp|valkey\.ocsp"
)

CHILD = r"""
import importlib, importlib.machinery, importlib.metadata as md, json, pkgutil, re, sys
allowed, packages, unused = json.loads(sys.argv[1])
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
allowed = {norm(n) for n in allowed}
hidden = {top for top, dists in md.packages_distributions().items()
          if top != "vllm" and not any(norm(d) in allowed for d in dists)}

class Hidden(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            return None
        return super().find_spec(name, path, target)

sys.meta_path[:] = [Hidden if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
importlib.import_module("vllm")  # vLLM itself must import; only its submodules may fail on CPU
missing = {}

def load(name):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in hidden:
            missing.setdefault(error.name, []).append(name)
    except Exception:
        pass  # CUDA libraries or kernels that do not load on this machine

for package in packages:
    module = load(package)
    if hasattr(module, "__path__"):
        for info in pkgutil.walk_packages(module.__path__, package + ".", onerror=lambda _: None):
            if not re.search(unused, info.name):
                load(info.name)
print(json.dumps(missing))
"""


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==")
            found[name.strip()] = version.strip()
    return found


def names(path: Path) -> list[str]:
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_site_pins_the_vllm_the_project_pins() -> None:
    """The GPU machine's torch is 2.11, so its bundle carries the ``vllm`` extra's release."""
    extra = re.search(r'^vllm = \["vllm==([^"]+)"\]', (ROOT / "pyproject.toml").read_text(), re.M)
    assert extra is not None
    assert extra.group(1) == pins(GPU / "site.txt")["vllm"]


def test_the_serving_path_imports_with_only_the_image_and_the_bundle() -> None:
    allowed = names(GPU / "device-packages.txt") + list(pins(GPU / "site.txt"))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([allowed, SERVING_PACKAGES, UNUSED.pattern])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    missing = json.loads(done.stdout.strip().splitlines()[-1])
    assert missing == {}, f"add to benchmarks/gpu/site.txt what provides: {missing}"


def test_list_files_tell_pins_from_urls(tmp_path: Path) -> None:
    """A package named http... (httpx2) is a pin, not an sdist URL; comments are dropped."""
    sys.path.insert(0, str(GPU))
    try:
        from bundle import requirements
    finally:
        sys.path.remove(str(GPU))
    listing = tmp_path / "list.txt"
    listing.write_text(
        "# header\nhttpx2==2.16.2  # a comment\nbuild: ninja==1.13.0\n"
        "https://example.org/lmcache-0.5.6.tar.gz#sha256=ab\n"
    )
    runtime, build, urls = requirements(listing)
    assert runtime == ["httpx2==2.16.2"]
    assert build == ["ninja==1.13.0"]
    assert urls == ["https://example.org/lmcache-0.5.6.tar.gz#sha256=ab"]
    assert set(requirements(GPU / "site.txt")[0]) >= {"httpx2==2.16.2", "httpcore2==2.16.2"}
