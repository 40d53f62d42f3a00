"""Status and conditions, computed from what was observed: pure, so it is testable and stable.

Conditions follow the Kubernetes API conventions: a transition time that moves only when
`status` changes, and `observedGeneration` on each. The same inputs give the same status,
so an unchanged world is never patched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmcache_operator import quantity
from lmcache_operator.capacity import Verdict
from lmcache_operator.render import sizing as render_sizing
from lmcache_operator.spec import Spec

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
CONFIG_VALID = "ConfigValid"
VALKEY_READY = "ValkeyReady"
SCHEDULABLE = "Schedulable"
# kstatus' abnormal-true pair (Flux, Argo CD, `kubectl wait`, cli-utils read them): working
# towards the spec, or stuck until someone acts.
RECONCILING = "Reconciling"
STALLED = "Stalled"
CONDITION_TYPES = (
    READY,
    PROGRESSING,
    DEGRADED,
    CONFIG_VALID,
    VALKEY_READY,
    SCHEDULABLE,
    RECONCILING,
    STALLED,
)

# Bad from the start: worth a Warning even on a new object (not Ready is just young).
_BAD_AT_BIRTH = {DEGRADED, CONFIG_VALID, SCHEDULABLE}
# The status that calls for a human's attention, per condition type (Warning events).
_BAD = {
    READY: "False",
    DEGRADED: "True",
    CONFIG_VALID: "False",
    VALKEY_READY: "False",
    SCHEDULABLE: "False",
}
# Conditions that only restate others: no Event of their own.
_SILENT = {RECONCILING, STALLED}


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    """Everything a status depends on, gathered by the reconciler."""

    generation: int
    replicas: int
    config_error: str | None = None
    blocked: tuple[str, str] | None = None  # (reason, message): nothing could be applied
    engine_image: str | None = None
    sizing: Mapping[str, Any] | None = None
    deployment: Mapping[str, Any] | None = None
    valkey_enabled: bool = False
    valkey: Mapping[str, Any] | None = None
    remote_url: str | None = None
    capacity: Verdict | None = None
    config_hash: str | None = None
    valkey_endpoint: str | None = None
    selector: str | None = None


def _c(type_: str, ok: bool, reason: str, message: str, *, true_is_ok: bool = True) -> Condition:
    return Condition(type_, "True" if ok == true_is_ok else "False", reason, message)


def _rollout(obs: Observed) -> tuple[bool, str, str, str | None]:
    """(settled, reason, message, failure reason) of the vLLM Deployment."""
    dep = obs.deployment
    if dep is None:
        return False, "Creating", "the vLLM Deployment does not exist yet", None
    st = dep.get("status") or {}
    for cond in st.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return (
                False,
                "ProgressDeadlineExceeded",
                cond.get("message", ""),
                "ProgressDeadlineExceeded",
            )
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return False, "ReplicaFailure", cond.get("message", ""), "ReplicaFailure"
    want = obs.replicas
    if (st.get("observedGeneration") or 0) < (dep.get("metadata", {}).get("generation") or 0):
        return False, "RollingOut", "the Deployment controller has not seen the new spec", None
    counts = {
        k: st.get(k) or 0
        for k in ("replicas", "updatedReplicas", "readyReplicas", "availableReplicas")
    }
    if (
        counts["updatedReplicas"] < want
        or counts["availableReplicas"] < want
        or (counts["replicas"] > want)
    ):
        return (
            False,
            "RollingOut",
            f"{counts['updatedReplicas']}/{want} updated, {counts['availableReplicas']}/{want} "
            f"available",
            None,
        )
    return True, "RolloutComplete", f"{counts['readyReplicas']}/{want} replicas ready", None


def _valkey(obs: Observed) -> Condition:
    if not obs.valkey_enabled:
        if obs.remote_url:
            return _c(VALKEY_READY, True, "External", "using the external remote (not probed)")
        return _c(VALKEY_READY, True, "NotRequired", "no remote tier configured")
    sts = obs.valkey
    st = (sts or {}).get("status") or {}
    if (
        sts
        and (st.get("readyReplicas") or 0) >= 1
        and (st.get("observedGeneration") or 0) >= (sts.get("metadata", {}).get("generation") or 0)
    ):
        return _c(VALKEY_READY, True, "Ready", f"Valkey serving at {obs.valkey_endpoint}")
    return _c(VALKEY_READY, False, "NotReady", "the Valkey StatefulSet has no ready pod yet")


def _schedulable(obs: Observed) -> Condition:
    if obs.config_error:
        return Condition(SCHEDULABLE, "Unknown", "InvalidSpec", "no pod shape from an invalid spec")
    if obs.capacity is None:
        return Condition(
            SCHEDULABLE, "Unknown", "NodesUnknown", "nodes are not watched (--no-read-nodes)"
        )
    return _c(
        SCHEDULABLE,
        obs.capacity.fits,
        "NodeAvailable" if obs.capacity.fits else "InsufficientCapacity",
        obs.capacity.message,
    )


def _kstatus(ready: Condition, degraded: Condition) -> list[Condition]:
    stalled = degraded.status == "True"
    working = ready.status != "True" and not stalled
    return [
        _c(RECONCILING, working, ready.reason if working else "Idle", ready.message),
        _c(STALLED, stalled, degraded.reason, degraded.message),
    ]


def conditions(obs: Observed) -> list[Condition]:
    """All eight conditions, always present, so clients can rely on them."""
    if obs.config_error:
        ready = _c(READY, False, "InvalidSpec", "the spec is invalid; see ConfigValid")
        degraded = _c(DEGRADED, True, "InvalidSpec", obs.config_error)
        return [
            ready,
            _c(PROGRESSING, False, "InvalidSpec", "nothing is applied until the spec is fixed"),
            degraded,
            _c(CONFIG_VALID, False, "InvalidSpec", obs.config_error),
            _valkey(obs),
            _schedulable(obs),
            *_kstatus(ready, degraded),
        ]
    valkey = _valkey(obs)
    settled, reason, message, failure = _rollout(obs)
    if obs.blocked:
        degraded = _c(DEGRADED, True, *obs.blocked)
    elif failure:
        degraded = _c(DEGRADED, True, failure, message)
    else:
        degraded = _c(DEGRADED, False, "AsExpected", "no failure observed")
    ready_ok = settled and valkey.status == "True" and not obs.blocked
    if ready_ok:
        ready = _c(READY, True, "ScaledToZero" if obs.replicas == 0 else "Available", message)
    elif not settled:
        ready = _c(READY, False, reason, message)
    elif obs.blocked:
        ready = _c(READY, False, *obs.blocked)
    else:
        ready = _c(READY, False, "ValkeyNotReady", valkey.message)
    progressing = _c(
        PROGRESSING,
        not settled and failure is None,
        reason if not settled else "RolloutComplete",
        message,
    )
    return [
        ready,
        progressing,
        degraded,
        _c(CONFIG_VALID, True, "Valid", "the spec is valid"),
        valkey,
        _schedulable(obs),
        *_kstatus(ready, degraded),
    ]


def phase(conds: Sequence[Condition]) -> str:
    by = {c.type: c for c in conds}
    if by[CONFIG_VALID].status == "False":
        return "Invalid"
    if by[DEGRADED].status == "True":
        return "Degraded"
    if by[READY].status == "True":
        return "Ready"
    return "Progressing"


def merge_conditions(
    previous: Sequence[Mapping[str, Any]], conds: Sequence[Condition], generation: int, now: str
) -> list[dict[str, Any]]:
    """Conditions as stored: the old lastTransitionTime survives while the status holds."""
    before = {c.get("type"): c for c in previous}
    out = []
    for c in conds:
        old = before.get(c.type)
        moved = old is None or old.get("status") != c.status
        out.append(
            {
                "type": c.type,
                "status": c.status,
                "reason": c.reason,
                "message": c.message,
                "lastTransitionTime": now
                if moved or old is None
                else old.get("lastTransitionTime", now),
                "observedGeneration": generation,
            }
        )
    return out


def build(previous: Mapping[str, Any], obs: Observed, now: str) -> dict[str, Any]:
    """The whole `.status`, reusing the previous transition times."""
    conds = conditions(obs)
    dep_status = (obs.deployment or {}).get("status") or {}
    status: dict[str, Any] = {
        "observedGeneration": obs.generation,
        "phase": phase(conds),
        "replicas": dep_status.get("replicas") or 0,
        "readyReplicas": dep_status.get("readyReplicas") or 0,
        "conditions": merge_conditions(
            previous.get("conditions") or [], conds, obs.generation, now
        ),
    }
    # None deletes the key in the merge patch; an invalid spec keeps the hash applied last.
    status["configHash"] = obs.config_hash or previous.get("configHash")
    status["engineImage"] = obs.engine_image or previous.get("engineImage")
    status["sizing"] = obs.sizing or previous.get("sizing")
    status["valkeyEndpoint"] = obs.valkey_endpoint
    status["selector"] = obs.selector
    return status


def sizing(spec: Spec, verdict: Verdict | None) -> dict[str, Any]:
    """What one pod requests, and how many such pods the eligible nodes' allocatable could
    hold (an upper bound: other workloads are not subtracted)."""
    out: dict[str, Any] = {
        "gpusPerPod": spec.gpus_per_pod,
        "memoryPerPod": render_sizing.container_memory(spec),
        "hugepagesPerPod": quantity.format_binary(render_sizing.hugepages_per_pod(spec)),
        "ephemeralStoragePerPod": quantity.format_binary(
            render_sizing.ephemeral_storage_bytes(spec)
        ),
        "diskTierPerPod": quantity.format_binary(render_sizing.disk_tier_bytes(spec)),
    }
    if verdict is not None:
        out["eligibleNodes"] = verdict.eligible_nodes
        out["maxReplicas"] = verdict.max_replicas
        out["additionalReplicas"] = max(0, verdict.max_replicas - spec.replicas)
    return out


def changed(previous: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether a patch is worth sending; the fields we do not set are ignored."""
    return any(previous.get(k) != v for k, v in new.items())


@dataclass(frozen=True)
class Transition:
    type: str  # Normal or Warning
    reason: str
    message: str


def transitions(previous: Mapping[str, Any], new: Mapping[str, Any]) -> list[Transition]:
    """An Event per condition whose status moved, or that starts out bad where that is news."""
    before = {c.get("type"): c for c in previous.get("conditions") or []}
    out = []
    for cond in new.get("conditions") or []:
        old = before.get(cond["type"])
        bad = _BAD.get(cond["type"]) == cond["status"]
        restated = cond["type"] == DEGRADED and cond["reason"] == "InvalidSpec"
        if cond["type"] in _SILENT or restated:
            continue  # other conditions already tell this story
        born_bad = old is None and bad and cond["type"] in _BAD_AT_BIRTH
        if born_bad or (old is not None and old.get("status") != cond["status"]):
            out.append(
                Transition(
                    "Warning" if bad else "Normal",
                    cond["reason"],
                    f"{cond['type']}={cond['status']}: {cond['message']}",
                )
            )
    return out
