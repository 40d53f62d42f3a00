"""Conditions as the API conventions want them: stable transition times, no flapping."""

from __future__ import annotations

from lmcache_operator import status
from lmcache_operator.capacity import Verdict


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
