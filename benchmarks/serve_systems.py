"""The servers the serving benchmark compares: how each is started, watched and stopped.

Every server is the same ``vllm serve`` with the same flags; they differ only in what offloads
KV to CPU memory:

* ``vllm``: nothing (its warm request is a hit in vLLM's own GPU prefix cache: the floor);
* ``ours``: this repo's engine through vLLM's built-in ``LMCacheConnectorV1`` and the seed's
  config file, with the repo on ``PYTHONPATH``;
* ``native``: vLLM's own ``OffloadingConnector`` (``--kv-offloading-size``), same CPU size;
* ``upstream``: upstream LMCache through the same connector and config file, from its own
  ``PYTHONPATH`` (its import name is ``lmcache`` too, so it never shares a path with ours).

On request (``--systems``), ``ours`` with one direction off (``kv_role``): with nothing reused
they separate what our stores cost from what vLLM's KV-connector path costs by itself.

``VLLM_SERVER_DEV_MODE=1`` gives every server ``/reset_prefix_cache``; the widened-dummy-weights
plugin (``benchmarks/gpu/plugin``) is on every server's path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SYSTEMS = ("vllm", "ours", "native", "upstream")
"""Measured by default."""
DIAGNOSTIC = {"ours-store-only": "kv_producer", "ours-load-only": "kv_consumer"}
"""``ours`` with loads or stores off, by ``kv_role``. vLLM itself defers freeing a finished
request's blocks by a step when a connector may load (``kv_consumer`` or ``kv_both``) under
async scheduling; a store-only server has no such deferral."""
KNOWN = SYSTEMS + tuple(DIAGNOSTIC)


def kv_transfer(role: str = "kv_both") -> str:
    """``--kv-transfer-config`` for vLLM's built-in LMCache connector."""
    return json.dumps({"kv_connector": "LMCacheConnectorV1", "kv_role": role})


VLLM_CLI = "vllm.entrypoints.cli.main"
PLUGIN_DIR = Path(__file__).resolve().parent / "gpu" / "plugin"
LOG_PATTERNS = {
    "vllm": r"prefix cache|Prefix cache",
    "ours": r"LMCache",
    "native": r"[Oo]ffload",
    "upstream": r"LMCache",
    **{name: r"LMCache" for name in DIAGNOSTIC},
}


def seed_config(cpu_gb: float) -> str:
    """The seed's ``cpu-offload.yaml`` (chunk 256, CPU cache on), with the CPU size given."""
    return f"chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: {cpu_gb}\n"


@dataclass(frozen=True)
class Layout:
    """Where the pieces are on this machine."""

    python: str
    model: Path
    repo: Path
    """The checkout whose ``lmcache/`` is ours."""
    config_file: Path
    """The seed's LMCache config file (written by the driver)."""
    site: tuple[str, ...] = ()
    """Put first on every server's path: vLLM and its dependencies where they are not installed."""
    upstream: tuple[str, ...] | None = None
    """Upstream LMCache's path entries; None = not available on this machine."""
    vllm_module: str = VLLM_CLI


@dataclass(frozen=True)
class ServerSpec:
    name: str
    port: int
    argv: list[str]
    env: dict[str, str]
    """Variables set on top of the driver's environment."""


def common_flags(
    max_model_len: int, gpu_memory_utilization: float, kv_cache_bytes: int, extra: list[str]
) -> list[str]:
    """Flags every server gets, whatever offloads its KV."""
    return [
        "--served-model-name",
        "llama",
        "--load-format",
        "dummy",
        "--skip-tokenizer-init",
        "--max-model-len",
        str(max_model_len),
        "--gpu-memory-utilization",
        str(gpu_memory_utilization),
        "--kv-cache-memory-bytes",
        str(kv_cache_bytes),
        "--disable-uvicorn-access-log",
        *extra,
    ]


def server_spec(
    name: str, layout: Layout, port: int, flags: list[str], cpu_gb: float
) -> ServerSpec:
    """The command line and environment of one system's server (pure).

    ``PYTHONPATH`` is set, not extended: an inherited entry holding our ``lmcache`` must not
    reach the upstream server (extra entries go in ``Layout.site``).
    """
    if name not in KNOWN:
        raise ValueError(f"unknown system {name!r}; systems are {', '.join(KNOWN)}")
    if name == "upstream" and layout.upstream is None:
        raise ValueError("upstream LMCache is not available here (pass --upstream-path)")
    path: list[str] = []
    offload: list[str] = []
    env = {
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_USE_FLASHINFER_SAMPLER": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    ours = name == "ours" or name in DIAGNOSTIC
    if ours:
        path.append(str(layout.repo))
    elif name == "upstream":
        path.extend(layout.upstream or ())
    if ours or name == "upstream":
        offload = ["--kv-transfer-config", kv_transfer(DIAGNOSTIC.get(name, "kv_both"))]
        env["LMCACHE_CONFIG_FILE"] = str(layout.config_file)
    elif name == "native":
        offload = ["--kv-offloading-size", str(cpu_gb)]
    path.extend([str(PLUGIN_DIR), *layout.site])
    env["PYTHONPATH"] = os.pathsep.join(path)
    argv = [
        layout.python,
        "-m",
        layout.vllm_module,
        "serve",
        str(layout.model),
        "--port",
        str(port),
        *flags,
        *offload,
    ]
    return ServerSpec(name, port, argv, env)


def start(spec: ServerSpec, log_path: Path, environ: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start a server in its own process group (vLLM forks an engine core and workers).

    It runs in the log's folder, not the caller's: ``python -m`` puts the working directory
    first on ``sys.path``, and from the checkout our ``lmcache/`` would shadow upstream's."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        return subprocess.Popen(
            spec.argv,
            cwd=log_path.parent,
            env={**environ, **spec.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM the server's process group, SIGKILL it if it outlives ``timeout_s``."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError):  # what the group's leader left behind
        os.killpg(process.pid, signal.SIGKILL)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@dataclass
class Launched:
    url: str
    process: subprocess.Popen[bytes] | None
    """None for a server the driver attached to (or has stopped)."""
    at: float
    """``time.monotonic()`` at launch."""

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


def wait_healthy(
    servers: Mapping[str, Launched], deadline: float
) -> dict[str, tuple[float | None, str | None]]:
    """Poll every server's ``/health`` until each is up, has exited, or ``deadline`` (monotonic).

    Returns ``{name: (seconds from launch to healthy, error)}``; one server's failure does not
    stop the others' wait.
    """
    status: dict[str, tuple[float | None, str | None]] = {}
    while len(status) < len(servers):
        for name, server in servers.items():
            if name in status:
                continue
            if server.process is not None and server.process.poll() is not None:
                status[name] = (
                    None,
                    f"exited with code {server.process.returncode} before healthy",
                )
            elif healthy(server.url):
                status[name] = (time.monotonic() - server.at, None)
        if time.monotonic() > deadline:
            for name, server in servers.items():
                waited = time.monotonic() - server.at
                status.setdefault(name, (None, f"not healthy {waited:.0f} s after its launch"))
        elif len(status) < len(servers):
            time.sleep(1)  # polling external servers' readiness, bounded by the deadline
    return status


def log_lines(log_path: Path, pattern: str, last: int = 200) -> list[str]:
    """The last ``last`` lines of a server log matching ``pattern``."""
    if not log_path.exists():
        return []
    regex = re.compile(pattern)
    lines = log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if regex.search(line)][-last:]


def log_tail(log_path: Path, last: int = 40) -> list[str]:
    if not log_path.exists():
        return []
    return log_path.read_text(errors="replace").splitlines()[-last:]
