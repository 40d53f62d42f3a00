"""``remote_url`` → where and how to connect, with credentials that never reach a log line.

Credentials may sit in the URL or come from ``LMCACHE_REMOTE_USERNAME`` /
``LMCACHE_REMOTE_PASSWORD`` (injected from a Kubernetes Secret); the environment wins, so a URL
kept in a ConfigMap never has to carry a secret.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from valkey.connection import Connection, SSLConnection, UnixDomainSocketConnection

from lmcache.config import REMOTE_SCHEMES, ConfigError, redact_url

USERNAME_ENV = "LMCACHE_REMOTE_USERNAME"
PASSWORD_ENV = "LMCACHE_REMOTE_PASSWORD"
DEFAULT_PORT = 6379
_TLS_SCHEMES = ("valkeys", "rediss")
_CERT_REQS = ("required", "optional", "none")
_TRUE = ("1", "true", "yes", "on")
_TLS_QUERY = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")


@dataclass(frozen=True)
class RemoteTarget:
    """A parsed ``remote_url``; ``str()`` is safe to log (no password)."""

    scheme: str
    host: str = ""
    port: int = DEFAULT_PORT
    path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.scheme in _TLS_SCHEMES

    def __str__(self) -> str:
        where = (
            f"unix://{self.path}"
            if self.scheme == "unix"
            else (f"{self.scheme}://{self.host}:{self.port}")
        )
        user = f" as {self.username}" if self.username else ""
        auth = " with password" if self.password else ""
        return f"{where} db={self.db}{user}{auth}"

    def connection_kwargs(self, timeout_s: float) -> dict[str, Any]:
        """Keyword arguments for a valkey ``ConnectionPool``: class, address, auth, timeouts."""
        common: dict[str, Any] = {
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "socket_timeout": timeout_s,
            # No CLIENT SETINFO round trips on connect: a new connection costs AUTH/SELECT only.
            "lib_name": None,
            "lib_version": None,
        }
        if self.scheme == "unix":
            return {**common, "connection_class": UnixDomainSocketConnection, "path": self.path}
        common.update(
            host=self.host, port=self.port, socket_connect_timeout=timeout_s, socket_keepalive=True
        )
        if self.tls:
            return {**common, "connection_class": SSLConnection, **self.tls_options}
        return {**common, "connection_class": Connection}


def parse_remote_url(
    url: str, source: str = "remote_url", env: Mapping[str, str] | None = None
) -> RemoteTarget:
    """Parse and validate ``url``; errors name the key's ``source`` and never show a password."""
    env = os.environ if env is None else env
    shown = redact_url(url)

    def bad(problem: str) -> ConfigError:
        return ConfigError(f"remote_url: invalid value {shown!r} from {source}; {problem}")

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise bad(f"allowed: a URL with a numeric port ({err})") from None
    scheme = parts.scheme.lower()
    if scheme not in REMOTE_SCHEMES:
        raise bad("allowed: a URL with scheme " + ", ".join(f"{s}://" for s in REMOTE_SCHEMES))
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    allowed_query = ("db", *_TLS_QUERY) if scheme in _TLS_SCHEMES else ("db",)
    unknown = sorted(set(query) - set(allowed_query))
    if unknown:
        raise bad(f"unknown query parameter(s) {unknown}; allowed: {list(allowed_query)}")
    username = env.get(USERNAME_ENV) or (unquote(parts.username) if parts.username else None)
    password = env.get(PASSWORD_ENV) or (unquote(parts.password) if parts.password else None)
    db_text = query.get("db") or ("" if scheme == "unix" else parts.path.strip("/"))
    if db_text and not db_text.isdigit():
        raise bad(f"database {db_text!r} is not a number; allowed: /<db> with db >= 0")
    db = int(db_text) if db_text else 0
    if scheme == "unix":
        if not parts.path:
            raise bad("allowed: unix:///path/to/socket (the socket path is missing)")
        return RemoteTarget(
            scheme, path=unquote(parts.path), db=db, username=username, password=password
        )
    if not parts.hostname:
        raise bad(f"the host is missing; allowed: {scheme}://host:port[/db]")
    return RemoteTarget(
        scheme,
        host=parts.hostname,
        port=port or DEFAULT_PORT,
        db=db,
        username=username,
        password=password,
        tls_options=_tls_options(query, bad),
    )


def _tls_options(query: Mapping[str, str], bad: Callable[[str], ConfigError]) -> dict[str, Any]:
    options: dict[str, Any] = {k: v for k, v in query.items() if k in _TLS_QUERY}
    if options.get("ssl_cert_reqs", "required") not in _CERT_REQS:
        raise bad(f"ssl_cert_reqs={options['ssl_cert_reqs']!r}; allowed: {list(_CERT_REQS)}")
    if "ssl_check_hostname" in options:
        options["ssl_check_hostname"] = options["ssl_check_hostname"].lower() in _TRUE
    return options
