"""The Valkey/Redis remote tier (see ``docs/remote.md``)."""

from __future__ import annotations

import logging

from lmcache.config import GB, ConfigError, LMCacheEngineConfig
from lmcache.metrics import EngineMetrics
from lmcache.spec import KVSpec
from lmcache.storage.backend import StorageBackend
from lmcache.storage.remote.backend import RemoteBackend, RemoteSettings
from lmcache.storage.remote.client import RemoteAuthError, RemoteClient, RemoteError
from lmcache.storage.remote.url import PASSWORD_ENV, USERNAME_ENV, parse_remote_url

__all__ = ["RemoteBackend", "create_remote_backend"]

logger = logging.getLogger("lmcache")

MAX_CONNECTIONS = 32
"""Request threads plus the writer; more would only queue on the server's single thread."""


def create_remote_backend(
    config: LMCacheEngineConfig, spec: KVSpec, metrics: EngineMetrics
) -> StorageBackend:
    """Connect to ``config.remote_url``, waiting at most one ``remote_timeout_ms``.

    Refused credentials raise ``ConfigError`` (a misconfiguration should fail the pod loudly);
    an unreachable server only opens the breaker, and the tier joins once a probe succeeds.
    """
    if not config.remote_url:
        raise ConfigError("remote_url: not set; allowed: a valkey://host:port[/db] URL")
    source = config.source_of("remote_url")
    target = parse_remote_url(config.remote_url, source=str(source))
    settings = RemoteSettings.from_config(config, spec)
    if settings.queue_bytes < settings.slot_bytes:
        raise ConfigError(
            f"remote_write_queue_size: {config.remote_write_queue_size:g} GB "
            f"({config.source_of('remote_write_queue_size')}) holds no chunk of this model; "
            f"allowed: at least {settings.slot_bytes / GB:.4f} GB"
        )
    client = RemoteClient(target, settings.timeout_s, MAX_CONNECTIONS)
    try:
        client.ping(settings.timeout_s)
    except RemoteAuthError as err:
        client.close()
        raise ConfigError(
            f"remote_url: {target} refused the credentials ({err}); they come from "
            f"{_credential_source(str(source))}; allowed: the server's user and password"
        ) from None
    except RemoteError as err:
        backend = RemoteBackend(client, settings, spec, metrics)
        backend.breaker.trip(f"unreachable at start-up: {err}")
        return backend
    logger.info("remote tier: %s (timeout %g ms)", target, config.remote_timeout_ms)
    return RemoteBackend(client, settings, spec, metrics)


def _credential_source(url_source: str) -> str:
    return f"{USERNAME_ENV}/{PASSWORD_ENV} if set, else the URL ({url_source})"
