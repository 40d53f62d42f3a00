from __future__ import annotations

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
    assert 'lmcache_hit_tokens_total{model="test-model",rank="0"} 32.0' in body
    engine.close()
    with pytest.raises(ConnectionRefusedError):  # the endpoint stops with the engine
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
