"""Is a child already what we want? The no-churn check before every apply.

Two tests, both needed: the applied-hash annotation catches a change of what we render
(including fields we stopped setting, which only a fresh apply removes); the field-by-field
subset check catches a hand edit of a field we own. The server adds defaults and status,
so only the fields we set are compared, and an unset zero value equals an omitted one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from lmcache_operator import api
from lmcache_operator.render.common import Manifest, stable_hash

ANNOTATION_APPLIED = f"{api.GROUP}/applied-hash"


def with_applied_hash(manifest: Manifest) -> Manifest:
    """A copy carrying the hash of its own content, for the next reconcile to compare."""
    out = copy.deepcopy(manifest)
    meta = out["metadata"]
    meta.setdefault("annotations", {})[ANNOTATION_APPLIED] = stable_hash(manifest)
    return out


def _zero(value: Any) -> bool:
    return value in (None, False, 0, "", {}, [])


def _identity(item: Any) -> Any:
    """The merge key server-side apply uses for an item of a list-map (containers, env,
    volumes, ports, mounts...), or None for items of atomic lists (args, tolerations)."""
    if not isinstance(item, Mapping):
        return None
    if "mountPath" in item:
        return ("mountPath", item["mountPath"])
    if "containerPort" in item:
        return ("containerPort", item["containerPort"], item.get("protocol", "TCP"))
    if "port" in item and "targetPort" in item:
        return ("port", item["port"], item.get("protocol", "TCP"))
    if "name" in item:
        return ("name", item["name"])
    return None


def contains(live: Any, desired: Any) -> bool:
    """True when every field set in `desired` has the same value in `live`.

    Items of list-maps are matched by their key, so items another field manager added (a
    sidecar injected by a webhook, an env var set by a policy engine) are tolerated, as
    server-side apply itself keeps them; atomic lists must match exactly."""
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return live is None and all(_zero(v) for v in desired.values())
        return all(contains(live.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list):
            return live is None and not desired
        keys = [_identity(d) for d in desired]
        if desired and all(k is not None for k in keys):
            by_key = {_identity(item): item for item in live}
            return all(
                k in by_key and contains(by_key[k], d) for k, d in zip(keys, desired, strict=True)
            )
        return len(live) == len(desired) and all(map(contains, live, desired))
    if live is None:
        return _zero(desired)
    return bool(live == desired)


def up_to_date(live: Mapping[str, Any] | None, desired: Manifest) -> bool:
    """`desired` must already carry its applied-hash annotation (`with_applied_hash`)."""
    if live is None:
        return False
    return contains(live, desired)
