"""TLS (``rediss://``) and unix-socket transports carry the same data path."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from lmcache.storage.remote.devserver import BINARY, RedisServer

from .conftest import CHUNK, Tier


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca_and_server_cert(where: Path) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1, signed by it."""
    where.mkdir()
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=lmcache-test-ca",
        cwd=where,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
        cwd=where,
    )
    (where / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        cwd=where,
    )
    return where


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[RedisServer]:
    for tool in ("openssl", BINARY):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (CI installs it via .ci/run)")
    srv = RedisServer(tmp_path, tls_dir=make_ca_and_server_cert(tmp_path / "tls"))
    srv.start()
    yield srv
    srv.stop()


def round_trip(tier: Tier) -> None:
    sent = tier.buffer(CHUNK, 5)
    tier.write(["k"], [sent])
    got = tier.empty()
    assert tier.backend.load_prefix(["k"], [got]) == 1
    assert torch.equal(sent.raw(), got.raw())


def test_tls_round_trip(tls_server: RedisServer, make_tier: Callable[..., Tier]) -> None:
    round_trip(make_tier(tls_server.url))


def test_tls_with_an_unknown_ca_never_connects(
    tls_server: RedisServer, make_tier: Callable[..., Tier], tmp_path: Path
) -> None:
    """Certificate verification is on: a server the CA did not sign is unreachable."""
    other = make_ca_and_server_cert(tmp_path / "other")
    tier = make_tier(f"rediss://127.0.0.1:{tls_server.port}?ssl_ca_certs={other / 'ca.pem'}")
    assert tier.backend.breaker.is_open
    assert tier.backend.contains_prefix(["k"]) == 0


def test_unix_socket(
    start_server: Callable[..., RedisServer], make_tier: Callable[..., Tier], tmp_path: Path
) -> None:
    path = tmp_path / "valkey.sock"
    start_server(None, "--unixsocket", str(path), "--unixsocketperm", "700")
    round_trip(make_tier(f"unix://{path}"))
