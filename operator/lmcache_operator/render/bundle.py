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
    valkey_endpoint: str | None


def render(spec: Spec, owner: Owner, valkey_password: str | None) -> Bundle:
    """Children in apply order: config and Valkey before the pods that need them.

    `valkey_password` is the generated password to keep (None when no Secret is generated).
    """
    text = engine_config.config_yaml(engine_config.engine_config(spec, owner))
    digest = engine_config.config_hash(text)
    manifests: list[Manifest] = [engine_config.configmap(owner, text)]
    endpoint = None
    if spec.valkey.enabled:
        manifests += valkey.manifests(spec, owner, valkey_password)
        endpoint = f"{engine_config.valkey_host(owner)}:{engine_config.VALKEY_PORT}"
    manifests += [vllm.deployment(spec, owner, digest), vllm.service(spec, owner)]
    return Bundle(manifests=manifests, config_hash=digest, valkey_endpoint=endpoint)
