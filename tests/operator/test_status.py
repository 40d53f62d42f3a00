"""Conditions as the API conventions want them: stable transition times, no flapping."""

from __future__ import annotations

from typing import Any

import lupa.lua51
import yaml
from lmcache_operator import status
from lmcache_operator.capacity import Verdict

from tests.operator.fakes import ROOT


def observed(**kw: object) -> status.Observed:
    base: dict[str, object] = {"generation": 1, "replicas": 1, "capacity": Verdict(True, "ok")}
    base.update(kw)
    return status.Observed(**base)  # type: ignore[arg-type]


def done(replicas: int = 1, generation: int = 1) -> dict[str, object]:
    return {
        "metadata": {"generation": generation},
        "status": {
            "observedGeneration": generation,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
        },
    }


def by_type(st: dict[str, object]) -> dict[str, dict[str, object]]:
    return {c["type"]: c for c in st["conditions"]}  # type: ignore[attr-defined,index]


def test_transition_time_moves_only_when_status_changes() -> None:
    first = status.build({}, observed(), "t1")
    # Same status, different reason/message: the time stays.
    second = status.build(
        first,
        observed(deployment={"metadata": {"generation": 1}, "status": {"observedGeneration": 1}}),
        "t2",
    )
    assert by_type(second)["Ready"]["reason"] == "RollingOut"
    assert by_type(second)["Ready"]["lastTransitionTime"] == "t1"
    third = status.build(second, observed(deployment=done()), "t3")
    assert by_type(third)["Ready"]["status"] == "True"
    assert by_type(third)["Ready"]["lastTransitionTime"] == "t3"
    assert by_type(third)["ConfigValid"]["lastTransitionTime"] == "t1"


def test_same_world_same_status_so_no_patch() -> None:
    first = status.build({}, observed(deployment=done()), "t1")
    again = status.build(first, observed(deployment=done()), "t2")
    assert not status.changed(first, again)
    assert status.transitions(first, again) == []


def test_removed_fields_are_sent_as_null_for_the_merge_patch() -> None:
    before = status.build({}, observed(valkey_enabled=True, valkey_endpoint="v:6379"), "t1")
    after = status.build(before, observed(), "t2")
    assert after["valkeyEndpoint"] is None
    assert status.changed(before, after)


def test_phase_precedence() -> None:
    assert status.build({}, observed(config_error="bad"), "t")["phase"] == "Invalid"
    assert status.build({}, observed(blocked=("ApplyFailed", "409")), "t")["phase"] == "Degraded"
    assert status.build({}, observed(deployment=done()), "t")["phase"] == "Ready"
    assert status.build({}, observed(), "t")["phase"] == "Progressing"


def test_rollout_with_old_pods_still_around_is_progressing() -> None:
    dep = done(replicas=2)
    dep["status"]["replicas"] = 3  # type: ignore[index]  # a surge pod still terminating
    st = status.build({}, observed(replicas=2, deployment=dep), "t")
    assert by_type(st)["Progressing"]["status"] == "True"
    assert by_type(st)["Ready"]["status"] == "False"


def test_transition_events_warn_on_the_bad_side_only() -> None:
    ready = status.build({}, observed(deployment=done()), "t1")
    broken = status.build(
        ready,
        observed(
            deployment={
                "metadata": {"generation": 1},
                "status": {
                    "conditions": [
                        {
                            "type": "Progressing",
                            "status": "False",
                            "reason": "ProgressDeadlineExceeded",
                            "message": "stuck",
                        }
                    ]
                },
            }
        ),
        "t2",
    )
    events = {(t.type, t.reason) for t in status.transitions(ready, broken)}
    assert ("Warning", "ProgressDeadlineExceeded") in events
    healed = status.build(broken, observed(deployment=done()), "t3")
    assert ("Normal", "Available") in {
        (t.type, t.reason) for t in status.transitions(broken, healed)
    }


# --- the Argo CD health check (examples/gitops/argocd-health.yaml) ------------------------------

HEALTH = yaml.safe_load((ROOT / "examples/gitops/argocd-health.yaml").read_text())["data"][
    "resource.customizations.health.serving.lmcache-kube.io_LMCacheDeployment"
]


def argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    """Run the script as Argo CD does: Lua 5.1 (gopher-lua), the object as global `obj`."""
    lua = lupa.lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = _to_lua(lua, obj)
    result = lua.execute(HEALTH)
    return str(result["status"]), str(result["message"])


def _to_lua(lua: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


def cr_with(status: dict[str, Any] | None, generation: int = 2) -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": {"name": "d", "generation": generation}, "spec": {}}
    if status is not None:
        body["status"] = status
    return body


def built(obs: status.Observed) -> dict[str, Any]:
    return status.build({}, obs, "t")


def test_argocd_health_follows_the_operators_status() -> None:
    assert argocd_health(cr_with(None))[0] == "Progressing"
    ready = built(observed(generation=2, deployment=done()))
    assert argocd_health(cr_with(ready)) == ("Healthy", "1/1 replicas ready")
    assert argocd_health(cr_with(ready, generation=3))[0] == "Progressing"  # a newer spec
    rolling = built(observed(generation=2))
    status_, message = argocd_health(cr_with(rolling))
    assert status_ == "Progressing" and message.startswith("Creating")
    invalid = built(observed(generation=2, config_error="spec.replicas: expected int"))
    assert argocd_health(cr_with(invalid)) == (
        "Degraded",
        "InvalidSpec: spec.replicas: expected int",
    )
    blocked = built(observed(generation=2, blocked=("SecretMissing", "Secret pw not found")))
    assert argocd_health(cr_with(blocked)) == ("Degraded", "SecretMissing: Secret pw not found")
