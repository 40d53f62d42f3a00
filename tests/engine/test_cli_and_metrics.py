from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.engine.conftest import EngineFactory, random_kv, tokens


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcache", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def test_check_config_prints_values_and_sources(tmp_path: Path) -> None:
    config = tmp_path / "cpu-offload.yaml"
    config.write_text("chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 5.0\n")
    result = run_cli(
        "check-config",
        env={
            "LMCACHE_CONFIG_FILE": str(config),
            "LMCACHE_CHUNK_SIZE": "128",
            "LMCACHE_REMOTE_URL": "valkey://u:s3cret@v:6379",
        },
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert rows["chunk_size"] == ["128", "env", "LMCACHE_CHUNK_SIZE"]
    assert rows["max_local_cpu_size"] == ["5.0", "file", str(config)]
    assert rows["local_cpu_use_hugepages"] == ["False", "default"]
    assert "s3cret" not in result.stdout + result.stderr


def test_check_config_fails_with_one_message(tmp_path: Path) -> None:
    result = run_cli("check-config", env={"LMCACHE_MAX_LOCAL_CPU_SIZE": "0"})
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: max_local_cpu_size: invalid value '0' from env LMCACHE_MAX_LOCAL_CPU_SIZE; "
        "allowed: a number > 0 and <= 65536"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_metrics_endpoint_serves_engine_metrics(make_engine: EngineFactory) -> None:
    port = free_port()
    engine = make_engine(metrics_port=port)
    engine.store(tokens(32), random_kv(32))
    engine.lookup(tokens(32))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert 'lmcache:num_lookup_hits_total{model_name="test-model",worker_id="0"} 32.0' in body
    engine.close()
    with pytest.raises(ConnectionRefusedError):  # the endpoint stops with the engine
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


RANK = """
import sys, torch
from lmcache import KVSpec, LMCacheEngine, LMCacheEngineConfig
rank, port = int(sys.argv[1]), int(sys.argv[2])
config = LMCacheEngineConfig.from_mapping(
    {"chunk_size": 16, "max_local_cpu_size": 0.01, "metrics_port": port}
)
spec = KVSpec(2, 2, 8)
with LMCacheEngine(config, spec, "tp-model", world_size=2, rank=rank) as engine:
    n = 16 * (rank + 1)
    engine.store(list(range(n)), torch.zeros(spec.shape(n), dtype=spec.dtype))
    print("ready", flush=True)
    sys.stdin.read()  # serve until the test closes our stdin
"""


def test_every_rank_reaches_one_scrape(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR shared by the ranks' processes (the operator sets it),
    rank 0's endpoint serves every rank's metrics, under upstream LMCache's names and
    labels; the other ranks open no port."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    port = free_port()
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(rank), str(port)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in (1, 0)
    ]
    try:
        for process in ranks:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        for process in ranks:
            process.communicate(timeout=60)
    for rank, stored in ((0, 16), (1, 32)):
        labels = f'model_name="tp-model",worker_id="{rank}"'
        assert f"lmcache:num_stored_tokens_total{{{labels}}} {float(stored)}" in body
        assert f"lmcache:local_cache_usage{{{labels}}}" in body
    assert "python_gc" not in body and "vllm:" not in body, "only lmcache metrics"
