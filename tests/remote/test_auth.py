"""Credentials: wrong ones fail start-up with one clear error (never showing the secret);
right ones work from the URL or from the Secret-backed env vars; a later rotation is a logged,
counted failure that opens the breaker."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lmcache.cli import main
from lmcache.config import CONFIG_FILE_ENV, ConfigError
from lmcache.storage.remote.devserver import RedisServer
from lmcache.storage.remote.url import PASSWORD_ENV

from .conftest import CHUNK, Raw, Tier

SECRET = "s3cret-Pa55"


@pytest.fixture
def locked(start_server: Callable[..., RedisServer]) -> RedisServer:
    return start_server(SECRET)


def test_wrong_password_fails_start_up_without_showing_it(
    locked: RedisServer, make_tier: Callable[..., Tier]
) -> None:
    with pytest.raises(ConfigError, match="refused the credentials") as err:
        make_tier(f"redis://:not-{SECRET}x@127.0.0.1:{locked.port}")
    assert "not-" not in str(err.value)
    assert PASSWORD_ENV in str(err.value)


def test_missing_password_fails_start_up(
    locked: RedisServer, make_tier: Callable[..., Tier]
) -> None:
    with pytest.raises(ConfigError, match="refused the credentials"):
        make_tier(locked.url)


def test_password_in_url_works(locked: RedisServer, make_tier: Callable[..., Tier]) -> None:
    tier = make_tier(f"redis://:{SECRET}@127.0.0.1:{locked.port}")
    tier.write(["k"], [tier.buffer(CHUNK, 1)])
    assert tier.backend.load_prefix(["k"], [tier.empty()]) == 1


def test_password_from_env_wins_over_url(
    locked: RedisServer, make_tier: Callable[..., Tier], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    tier = make_tier(f"redis://:stale@127.0.0.1:{locked.port}")
    tier.write(["k"], [tier.buffer(CHUNK, 1)])
    assert tier.backend.contains_prefix(["k"]) == 1


def test_rotated_password_is_a_counted_failure(
    locked: RedisServer, make_tier: Callable[..., Tier], caplog: pytest.LogCaptureFixture
) -> None:
    tier = make_tier(
        f"redis://:{SECRET}@127.0.0.1:{locked.port}",
        remote_breaker_failures=1,
        remote_breaker_backoff_s=60,
    )
    raw = Raw(locked).client
    raw.config_set("requirepass", "rotated")
    raw.client_kill_filter(_type="normal", skipme=False)  # every connection re-authenticates

    assert tier.backend.contains_prefix(["k"]) == 0
    assert tier.value("lmcache_tier_errors_total", op="lookup") == 1
    assert tier.backend.breaker.is_open
    assert "remote tier" in caplog.text and "unavailable" in caplog.text
    assert SECRET not in caplog.text


def test_check_config_never_prints_credentials(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(CONFIG_FILE_ENV, raising=False)
    monkeypatch.setenv("LMCACHE_REMOTE_URL", f"valkey://app:{SECRET}@valkey:6379/1")
    monkeypatch.setenv(PASSWORD_ENV, "from-the-secret")
    assert main(["check-config"]) == 0
    out = capsys.readouterr()
    assert "valkey://app:***@valkey:6379/1" in out.out
    assert SECRET not in out.out + out.err and "from-the-secret" not in out.out + out.err
