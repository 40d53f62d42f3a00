"""The Helm chart, rendered by the real helm: lint, golden files, schema errors, what each value
set must produce, and that every derived file (README table, deploy/, golden) is in sync."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import chartctl
import pytest
import yaml

Obj = dict[str, Any]
SETS = {vs.name: vs for vs in chartctl.VALUE_SETS}


def rendered(name: str) -> list[Obj]:
    return chartctl.objects(chartctl.render(SETS[name]))


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def operator_deployment(objs: list[Obj]) -> Obj:
    (deployment,) = of_kind(objs, "Deployment")
    return deployment


def template_fails(helm: Path, *args: str) -> str:
    """stderr of a `helm template` that must fail."""
    argv: Sequence[str] = [str(helm), "template", "t", str(chartctl.CHART), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode != 0, f"helm template {' '.join(args)} rendered, but must fail"
    return proc.stderr


# --- derived files in sync ---------------------------------------------------------------------


def test_readme_values_table_matches_values_yaml() -> None:
    assert chartctl.readme(update=False) == [], "run `make chart-readme`"


def test_an_undocumented_value_is_named() -> None:
    text = "# -- documented\na: 1\nb:\n  # -- documented\n  c: 2\n  d: 3\n"
    with pytest.raises(chartctl.ChartError, match=r"no `# --` comment for b\.d$"):
        chartctl.values_table(text)


def test_every_value_is_used_by_a_template() -> None:
    templates = "".join(p.read_text() for p in (chartctl.CHART / "templates").iterdir())
    rows = chartctl.documented((chartctl.CHART / "values.yaml").read_text())
    unused = [r.path for r in rows if f".Values.{r.path}" not in templates]
    assert unused == [], f"values no template reads: {unused}"


def test_a_documented_map_covers_its_children() -> None:
    text = "# -- all resources\nresources:\n  limits:\n    memory: 1Gi\n"
    table = chartctl.values_table(text)
    assert '| `resources` | map | `{"limits":{"memory":"1Gi"}}` | all resources |' in table


@pytest.mark.parametrize("name", sorted(SETS))
def test_golden_render(helm: Path, name: str) -> None:
    vs = SETS[name]
    assert chartctl.check_or_write(vs.golden, chartctl.render(vs), update=False) == [], (
        "run `make chart-golden-update` and review the diff"
    )


def test_helm_lint_strict_with_every_value_set(helm: Path) -> None:
    chartctl.lint()


def test_deploy_manifests_match_the_chart(helm: Path, kubectl: Path) -> None:
    assert chartctl.deploy(update=False) == [], "run `make deploy-update`"


def test_package_versions_follow_chart_yaml() -> None:
    assert chartctl.versions() == []


def test_a_version_bump_in_chart_yaml_alone_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meta = {**chartctl.chart_meta(), "appVersion": "9.9.9"}
    (tmp_path / "Chart.yaml").write_text(yaml.safe_dump(meta))
    monkeypatch.setattr(chartctl, "CHART", tmp_path)
    problems = chartctl.versions()
    assert [p.split(":")[0] for p in problems] == [
        "pyproject.toml",
        "operator/pyproject.toml",
        "operator/lmcache_operator/api.py",
    ]


# --- the schema ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--set", "replicaCount=0"], "/replicaCount"),
        (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (["--set", "image.digest=sha256:abc"], "/image/digest"),
        (["--set", "image.tag=latest tag"], "/image/tag"),
        (["--set", "watchNamespaces={Team_A}"], "/watchNamespaces/0"),
        (["--set", "operator.logLevel=verbose"], "/operator/logLevel"),
        (["--set", "metrics.port=70000"], "/metrics/port"),
        (["--set", "metrics.serviceMonitor.interval=30"], "/metrics/serviceMonitor/interval"),
        (
            ["--set", "podDisruptionBudget.maxUnavailable=lots"],
            "/podDisruptionBudget/maxUnavailable",
        ),
        (["--set", "leaderElection.enabled=maybe"], "/leaderElection/enabled"),
        (["--set", "replicas=2"], "'replicas' not allowed"),
        (["--set", "resources.request.cpu=1"], "'request' not allowed"),
    ],
)
def test_schema_rejects_bad_values_naming_the_field(
    helm: Path, args: list[str], field: str
) -> None:
    stderr = template_fails(helm, *args)
    assert "values don't meet the specifications of the schema" in stderr
    assert field in stderr, stderr


def test_service_account_name_is_required_when_not_created(helm: Path) -> None:
    stderr = template_fails(helm, "--set", "serviceAccount.create=false")
    assert "serviceAccount.name is required" in stderr


# --- what each value set renders ---------------------------------------------------------------


def test_default_pod_is_locked_down(helm: Path) -> None:
    pod = operator_deployment(rendered("default"))["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["image"] == "ghcr.io/lmcache-kube/operator:0.1.0"
    assert "--all-namespaces" in container["args"]
    assert "--leader-election" in container["args"]
    assert "--identity=$(POD_NAME)" in container["args"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def grants(roles: list[Obj]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) → verbs, over every rule of `roles`."""
    out: dict[tuple[str, str], set[str]] = {}
    for role in roles:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def operator_roles(roles: list[Obj]) -> list[Obj]:
    """The roles the operator is bound to, not those aggregated into `view`/`edit`."""
    return [
        r
        for r in roles
        if not any(k.startswith(AGGREGATE) for k in r["metadata"].get("labels", {}))
    ]


def test_tenants_get_lmcachedeployments_through_the_default_roles(helm: Path) -> None:
    roles = {
        r["metadata"]["name"].rsplit("-", 1)[1]: r
        for r in of_kind(rendered("default"), "ClusterRole")
        if any(k.startswith(AGGREGATE) for k in r["metadata"]["labels"])
    }
    assert set(roles) == {"view", "edit"}
    view, edit = roles["view"], roles["edit"]
    for role, to in ((view, {"view", "edit", "admin"}), (edit, {"edit", "admin"})):
        labels = role["metadata"]["labels"]
        assert {k.removeprefix(AGGREGATE) for k in labels if k.startswith(AGGREGATE)} == to
        assert all(labels[f"{AGGREGATE}{t}"] == "true" for t in to)
    assert grants([view]) == {
        ("serving.lmcache-kube.io", r): {"get", "list", "watch"}
        for r in ("lmcachedeployments", "lmcachedeployments/status", "lmcachedeployments/scale")
    }
    edit_grants = grants([edit])
    assert "delete" in edit_grants[("serving.lmcache-kube.io", "lmcachedeployments")]
    assert ("serving.lmcache-kube.io", "lmcachedeployments/status") not in edit_grants


def test_rbac_is_exactly_what_the_operator_calls(helm: Path) -> None:
    """The rules follow lmcache_operator.kube and docs/operator.md's RBAC table: every kind it
    touches, and nothing else."""
    kube = pytest.importorskip(
        "lmcache_operator.kube", reason="the operator package is not installed"
    )
    objs = rendered("default")
    got = grants(operator_roles(of_kind(objs, "ClusterRole") + of_kind(objs, "Role")))
    want: dict[tuple[str, str], set[str]] = {}
    for api_version, kind in kube.CHILD_KINDS:
        group = api_version.rpartition("/")[0]
        want[(group, kube.PLURALS[(api_version, kind)])] = {
            "get",
            "list",
            "watch",
            "create",
            "patch",
            "delete",
        }
    want[("serving.lmcache-kube.io", "lmcachedeployments")] = {"get", "list", "watch"}
    want[("serving.lmcache-kube.io", "lmcachedeployments/status")] = {"get", "patch"}
    want[("serving.lmcache-kube.io", "lmcachedeployments/finalizers")] = {"update"}
    want[("", "events")] = {"create"}
    # Created once, read as metadata only, deleted with the Valkey server: never listed.
    want[("", "secrets")] = {"get", "create", "delete"}
    want[("", "nodes")] = {"list", "watch"}
    want[("coordination.k8s.io", "leases")] = {"get", "create", "update"}
    assert got == want


def test_default_is_cluster_wide(helm: Path) -> None:
    objs = rendered("default")
    crs = [
        r
        for r in operator_roles(of_kind(objs, "ClusterRole"))
        for rule in r["rules"]
        if "lmcachedeployments" in rule["resources"]
    ]
    assert len(crs) == 1
    (lease_role,) = of_kind(objs, "Role")
    assert lease_role["metadata"]["namespace"] == chartctl.NAMESPACE
    renew = [r for r in lease_role["rules"] if "update" in r["verbs"]]
    assert renew[0]["resourceNames"] == [operator_deployment(objs)["metadata"]["name"]]
    assert not of_kind(objs, "ServiceMonitor")
    assert not of_kind(objs, "LMCacheDeployment")


def test_namespaced_install_has_roles_only_in_watched_namespaces(helm: Path) -> None:
    objs = rendered("namespaced")
    cr_roles = [
        r
        for r in of_kind(objs, "Role")
        if any("lmcachedeployments" in x["resources"] for x in r["rules"])
    ]
    assert sorted(r["metadata"]["namespace"] for r in cr_roles) == ["team-a", "team-b"]
    bindings = {b["metadata"]["namespace"] for b in of_kind(objs, "RoleBinding")}
    assert {"team-a", "team-b", chartctl.NAMESPACE} == bindings
    assert not operator_roles(of_kind(objs, "ClusterRole")), (
        "readNodes is off: no cluster-scoped permission for the operator"
    )
    assert not of_kind(objs, "ClusterRoleBinding")
    args = operator_deployment(objs)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--all-namespaces" not in args
    assert "--no-read-nodes" in args  # without the RBAC, the operator must not watch nodes


def test_ha_spreads_replicas_and_keeps_a_quorum(helm: Path) -> None:
    objs = rendered("ha")
    deployment = operator_deployment(objs)
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert pod["containers"][0]["image"].endswith("@sha256:" + "0" * 64)
    (pdb,) = of_kind(objs, "PodDisruptionBudget")
    assert pdb["spec"] == {
        "minAvailable": 2,
        "selector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]},
    }
    (sample,) = of_kind(objs, "LMCacheDeployment")
    assert sample["spec"]["model"]


def test_monitoring_objects_need_the_prometheus_operator_api(helm: Path) -> None:
    with_api = rendered("monitoring")
    (sm,) = of_kind(with_api, "ServiceMonitor")
    (service,) = of_kind(with_api, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (pm,) = of_kind(with_api, "PodMonitor")
    endpoints = {e["port"]: e for e in pm["spec"]["podMetricsEndpoints"]}
    assert set(endpoints) == {"http", "lmcache-metrics"}
    # vLLM's /metrics repeats the engine's series (one multiprocess directory): kept once.
    (drop,) = endpoints["http"]["metricRelabelings"]
    assert (drop["action"], drop["regex"]) == ("drop", "lmcache[:_].*")
    assert "metricRelabelings" not in endpoints["lmcache-metrics"]
    without_api = chartctl.objects(chartctl.render(chartctl.ValueSet("monitoring")))
    assert not of_kind(without_api, "ServiceMonitor")
    assert not of_kind(without_api, "PodMonitor")


def test_dashboard_is_sidecar_discoverable_and_uses_real_metrics(helm: Path) -> None:
    (cm,) = [o for o in rendered("monitoring") if o["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["lmcache-kube.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\blmcache[_:][a-z_:]+", e)}
    assert used, "the dashboard queries no lmcache metrics"
    known = exported_metrics()
    assert used <= known, f"dashboard queries metrics nobody exports: {sorted(used - known)}"
    upstream = {m for m in used if m.startswith("lmcache:")}
    assert {"lmcache:num_lookup_hits_total", "lmcache:local_cache_usage"} <= upstream, (
        "the engine's series under upstream LMCache's names"
    )


def exported_metrics() -> set[str]:
    """Series names the engine and the operator export, read from their live registries."""
    import lmcache_operator.metrics  # noqa: F401 (registers the operator's metrics)
    from prometheus_client import REGISTRY

    from lmcache.metrics import EngineMetrics

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    families = [*EngineMetrics("m").registry.collect(), *REGISTRY.collect()]
    return {f.name + s for f in families for s in suffixes.get(f.type, ())}


# --- release ---------------------------------------------------------------------------------


def test_release_packages_the_chart_with_its_checksum(helm: Path, tmp_path: Path) -> None:
    package = chartctl.release(tmp_path)
    meta = chartctl.chart_meta()
    assert package.name == f"lmcache-operator-{meta['version']}.tgz"
    digest, name = (tmp_path / f"{package.name}.sha256").read_text().split()
    assert name == package.name
    assert digest == hashlib.sha256(package.read_bytes()).hexdigest()
    with tarfile.open(package) as tar:
        names = set(tar.getnames())
    assert "lmcache-operator/values.schema.json" in names
    assert "lmcache-operator/dashboards/lmcache-kube.json" in names
    assert any(n.startswith("lmcache-operator/crds/") for n in names)
    assert not any(n.startswith("lmcache-operator/ci/") for n in names), "ci/ is for checks only"


def test_pod_monitor_selects_the_engine_pods_the_operator_renders(helm: Path) -> None:
    """The PodMonitor's selector and ports against the operator's own render of the chart's
    sample, so a renamed port or label in the operator breaks this, not the dashboards."""
    pytest.importorskip("lmcache_operator", reason="the operator package is not installed")
    from lmcache_operator.render import vllm
    from lmcache_operator.render.common import Owner
    from lmcache_operator.spec import parse

    values = yaml.safe_load((chartctl.CHART / "values.yaml").read_text())
    engine = vllm.deployment(parse(values["sample"]["spec"]), Owner("x", "ns", "uid"), "hash")
    template = engine["spec"]["template"]
    ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    (pm,) = of_kind(rendered("monitoring"), "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports
