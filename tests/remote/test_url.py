"""``remote_url`` parsing: every scheme, db, credentials and their precedence, clear errors."""

from __future__ import annotations

import pytest
from valkey.connection import Connection, SSLConnection, UnixDomainSocketConnection

from lmcache.config import ConfigError
from lmcache.storage.remote.url import PASSWORD_ENV, USERNAME_ENV, parse_remote_url


def parse(url: str, **env: str) -> object:
    return parse_remote_url(url, "env LMCACHE_REMOTE_URL", env)


@pytest.mark.parametrize(
    ("url", "host", "port", "db", "cls"),
    [
        ("valkey://cache:6380/2", "cache", 6380, 2, Connection),
        ("redis://cache", "cache", 6379, 0, Connection),
        ("valkeys://cache:6380", "cache", 6380, 0, SSLConnection),
        ("rediss://cache/3", "cache", 6379, 3, SSLConnection),
        ("redis://cache?db=5", "cache", 6379, 5, Connection),
    ],
)
def test_tcp_schemes(url: str, host: str, port: int, db: int, cls: type) -> None:
    target = parse_remote_url(url, env={})
    kwargs = target.connection_kwargs(0.05)
    assert (target.host, target.port, target.db) == (host, port, db)
    assert kwargs["connection_class"] is cls
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.05


def test_unix_socket() -> None:
    target = parse_remote_url("unix:///run/valkey.sock?db=1", env={})
    kwargs = target.connection_kwargs(0.05)
    assert kwargs["connection_class"] is UnixDomainSocketConnection
    assert (kwargs["path"], kwargs["db"]) == ("/run/valkey.sock", 1)


def test_credentials_from_url_are_unquoted_and_never_shown() -> None:
    target = parse_remote_url("redis://app:p%40ss@cache:6379", env={})
    assert (target.username, target.password) == ("app", "p@ss")
    assert "p@ss" not in str(target) and "p@ss" not in repr(target)


def test_env_credentials_win() -> None:
    target = parse_remote_url("redis://app:old@cache", env={USERNAME_ENV: "u", PASSWORD_ENV: "new"})
    assert (target.username, target.password) == ("u", "new")


def test_tls_options_pass_through() -> None:
    target = parse_remote_url("rediss://cache?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=none", env={})
    kwargs = target.connection_kwargs(1.0)
    assert kwargs["ssl_ca_certs"] == "/etc/ca.pem" and kwargs["ssl_cert_reqs"] == "none"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://cache", "scheme"),
        ("redis://cache:notaport", "numeric port"),
        ("redis://cache/abc", "database 'abc'"),
        ("redis:///0", "host is missing"),
        ("unix://", "socket path is missing"),
        ("redis://cache?timeout=3", "unknown query parameter"),
        ("redis://cache?ssl_ca_certs=/x", "unknown query parameter"),
        ("rediss://cache?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ],
)
def test_bad_urls_name_the_key_and_source(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as err:
        parse(url)
    assert str(err.value).startswith("remote_url: invalid value")
    assert "env LMCACHE_REMOTE_URL" in str(err.value)


def test_error_hides_the_password() -> None:
    with pytest.raises(ConfigError) as err:
        parse("redis://u:hunter2@cache/abc")
    assert "hunter2" not in str(err.value)
