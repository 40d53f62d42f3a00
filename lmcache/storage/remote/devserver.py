"""A throwaway ``redis-server`` on a free loopback port, persistence off (tests, benchmarks).

Not used by the engine; it lives here so the tests and ``make bench-remote`` share one way of
starting, killing and restarting a real server.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARY = "redis-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One server process; ``kill`` and ``start`` again reuse the same port (a restart).

    With ``tls_dir`` (holding ``server.pem``, ``server.key``, ``ca.pem``) it listens with TLS only.
    """

    def __init__(
        self, workdir: Path, password: str | None = None, *extra: str, tls_dir: Path | None = None
    ) -> None:
        binary = shutil.which(BINARY)
        if binary is None:
            raise FileNotFoundError(f"{BINARY} not on PATH (Debian: apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.password = password
        self.extra = extra
        self.tls_dir = tls_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls_dir:
            return f"rediss://127.0.0.1:{self.port}?ssl_ca_certs={self.tls_dir / 'ca.pem'}"
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "no",
            *self.extra,
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls_dir:
            args += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-auth-clients",
                "no",
                "--tls-cert-file",
                str(self.tls_dir / "server.pem"),
                "--tls-key-file",
                str(self.tls_dir / "server.key"),
                "--tls-ca-cert-file",
                str(self.tls_dir / "ca.pem"),
            ]
        log = (self.workdir / f"redis-{self.port}.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Poll until the port accepts connections (or the process dies)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}; see "
                    f"{self.workdir}/redis-{self.port}.log"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    if self.tls_dir:
                        return  # accepting on the TLS port is all a plain socket can check
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64):
                        return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server on port {self.port} not ready") from None
                time.sleep(0.01)  # polling the port: no readiness notification to wait on

    def kill(self) -> None:
        """SIGKILL: the server dies without closing connections cleanly."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
