"""Everything one `LMCacheDeployment` should own, rendered together."""

from __future__ import annotations

from dataclasses import dataclass

from lmcache_operator.render import engine_config, valkey, vllm
from lmcache_operator.render.common import Manifest, Owner
from lmcache_operator.spec import Spec


@dataclass(frozen=True)
class Bundle:
    manifests: list[Manifest]
    config_hash: str


def valkey_endpoint(spec: Spec, owner: Owner) -> str | None:
    """host:port of the in-cluster Valkey, for status; None without one."""
    if not spec.valkey.enabled:
        return None
    return f"{engine_config.valkey_host(owner)}:{engine_config.VALKEY_PORT}"


def render(spec: Spec, owner: Owner, secret_hash: str | None = None) -> Bundle:
    """Children in apply order: config and Valkey before the pods that need them.

    `secret_hash` identifies the version of the Secret holding the remote tier's password
    (see `reconcile`), so that a new password restarts the pods that read it at start.
    """
    text = engine_config.config_yaml(engine_config.engine_config(spec, owner))
    digest = engine_config.config_hash(text)
    manifests: list[Manifest] = [engine_config.configmap(owner, text)]
    if spec.valkey.enabled:
        manifests += valkey.manifests(spec, owner, secret_hash)
    manifests += [vllm.deployment(spec, owner, digest, secret_hash), vllm.service(spec, owner)]
    if spec.kv_events.enabled:
        manifests.append(vllm.kv_events_service(spec, owner))
    return Bundle(manifests=manifests, config_hash=digest)
