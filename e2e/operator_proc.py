"""Run the operator as a local process exactly as the chart runs it in-cluster.

kwok runs no containers, so the chart's operator pod is only a scheduled, "Running" shell. The real
process runs here instead, built from what the cluster says about that pod: the container's args
and env (with `$(VAR)` and `fieldRef` resolved the way the kubelet would), and the identity of its
ServiceAccount (a token from the TokenRequest API), so the chart's RBAC is what is exercised.
Only the listen ports are moved to free ones, so parallel runs do not collide.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e.cluster import E2E_DIR, REPO, free_port
from e2e.kube import Cluster, Kube, is_true, wait_for

VENV_BIN = Path(sys.executable).parent
# E2E_CHART: another chart to test (a packaged .tgz, a release candidate); default this repo's.
CHART = Path(os.environ.get("E2E_CHART", REPO / "charts" / "lmcache-operator"))
# Not the names a user's own install would have: on a user's cluster nothing of theirs is touched.
RELEASE = "lmcache-e2e"
OPERATOR_NAMESPACE = "lmcache-e2e"
ENTRYPOINT = "lmcache-operator"  # images/operator/Dockerfile's ENTRYPOINT
PORT_FLAGS = ("--metrics-port", "--health-port")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in args/env: known names are replaced, `$$` escapes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


@dataclass(frozen=True)
class Release:
    """The chart installed by Helm: where it lives and its operator Deployment."""

    name: str
    namespace: str
    deployment: str


def install_chart(
    kube: Cluster,
    k8s: Kube,
    release: str = RELEASE,
    namespace: str = OPERATOR_NAMESPACE,
    values: Sequence[str] = (),
) -> Release:
    """`helm upgrade --install` of the chart, with extra `values` flags.

    Locally `--wait` holds until the operator pod is Ready (kwok makes it so; on the real node
    the pod really runs). On a user's cluster the chart's pod runs the published image, which may
    not be pullable there: the wait is for the CRD instead. If that pod does run, it and the local
    process share the leader Lease, and whichever holds it reconciles, which is what a user's
    cluster would do too.
    """
    others = [
        f"{d['metadata']['namespace']}/{d['metadata']['name']}"
        for d in k8s.items(
            "apps/v1", "Deployment", selector="app.kubernetes.io/name=lmcache-operator"
        )
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/instance") != release
    ]
    assert not others, f"another lmcache-operator runs here ({others}); it would fight the tests"
    args = ["upgrade", "--install", release, str(CHART), "-n", namespace, *values]
    args += ["--create-namespace"]
    if kube.local:
        args += ["--wait", "--timeout=180s"]
    kube.helm(*args)
    wait_for(
        "the chart's CRDs Established",
        lambda: all(
            is_true(crd, "Established")
            for crd in k8s.items("apiextensions.k8s.io/v1", "CustomResourceDefinition")
            if crd["spec"]["group"].endswith("lmcache-kube.io")
        ),
    )
    selector = f"app.kubernetes.io/instance={release}"
    deployments = k8s.items("apps/v1", "Deployment", namespace, selector)
    assert len(deployments) == 1, f"the chart should render one operator Deployment: {deployments}"
    return Release(release, namespace, deployments[0]["metadata"]["name"])


def uninstall_chart(kube: Cluster, release: Release) -> None:
    kube.helm("uninstall", release.name, "-n", release.namespace, "--wait", check=False)


class OperatorProcess:
    """The operator of a Helm release, run locally with the release's pod spec and identity.

    `extra_args` are appended to the pod's (a later flag wins in argparse), `server` replaces the
    API server's URL (a proxy in front of it), `instance` tells replicas of one release apart.
    """

    def __init__(
        self,
        kube: Cluster,
        namespace: str,
        deployment: str,
        extra_args: tuple[str, ...] = (),
        server: str | None = None,
        instance: str = "",
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.deployment = deployment
        self.extra_args = extra_args
        self.server = server
        self.instance = instance
        suffix = f"-{instance}" if instance else ""
        self.log_path = E2E_DIR / f"operator-{namespace}{suffix}.log"
        self.kubeconfig = E2E_DIR / f"operator-{namespace}{suffix}.kubeconfig"
        self.proc: subprocess.Popen[bytes] | None = None
        self.health_port = 0
        self.metrics_port = 0
        self.service_account = ""

    @property
    def username(self) -> str:
        """Who the API server sees: what audit events are filtered by."""
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"

    def _pod_spec(self) -> dict[str, Any]:
        d = Kube(self.kube.kubeconfig).get("apps/v1", "Deployment", self.deployment, self.namespace)
        if d is None:
            raise AssertionError(f"Deployment {self.namespace}/{self.deployment} not found")
        return dict(d["spec"]["template"]["spec"])

    def command(self, pod_name: str) -> tuple[list[str], dict[str, str]]:
        """argv and environment of the operator container, resolved as the kubelet would."""
        spec = self._pod_spec()
        self.service_account = spec.get("serviceAccountName") or "default"
        container = spec["containers"][0]
        env: dict[str, str] = {}
        field_refs = {"metadata.name": pod_name, "metadata.namespace": self.namespace}
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = expand(var["value"], env)
            elif "fieldRef" in (var.get("valueFrom") or {}):
                env[var["name"]] = field_refs[var["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                raise AssertionError(f"operator env {var['name']}: unsupported source {var}")
        command = container.get("command") or [ENTRYPOINT]
        args = [expand(a, env) for a in (container.get("args") or [])]
        argv = [str(VENV_BIN / command[0]), *command[1:], *args]
        self.health_port, self.metrics_port = free_port(), free_port()
        ports = {"--health-port": self.health_port, "--metrics-port": self.metrics_port}
        argv = [a for a in argv if a.split("=", 1)[0] not in PORT_FLAGS]
        argv += [f"{flag}={port}" for flag, port in ports.items()]
        return argv + list(self.extra_args), env

    def _write_kubeconfig(self) -> None:
        """The ServiceAccount's identity: a bound token, as the in-cluster pod would mount."""
        token = self.kube.kubectl(
            "create", "token", self.service_account, "-n", self.namespace, "--duration=2h"
        ).strip()
        raw = json.loads(self.kube.kubectl("config", "view", "--raw", "--minify", "-o", "json"))
        cluster = raw["clusters"][0]["cluster"]
        if self.server:
            cluster = {**cluster, "server": self.server}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": cluster}],
            "users": [{"name": "sa", "user": {"token": token}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "sa"}}],
            "current-context": "c",
        }
        self.kubeconfig.write_text(json.dumps(config))

    def start(self, timeout: float = 60.0) -> None:
        pod_name = f"{self.deployment}-local-{os.getpid()}{self.instance}"
        argv, env = self.command(pod_name)
        self._write_kubeconfig()
        full_env = {**os.environ, **env, "KUBECONFIG": str(self.kubeconfig)}
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- start {' '.join(argv)}\n".encode())
            self.proc = subprocess.Popen(
                argv, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for("the operator's /healthz", self._healthy, timeout)

    def _healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"operator exited; log tail:\n{self.log_tail()}")
        return self.health() == 200

    def health(self) -> int | None:
        """The HTTP status of GET /healthz (what the kubelet's liveness probe sees), or None
        when nothing answers."""
        url = f"http://127.0.0.1:{self.health_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except (urllib.error.URLError, OSError):
            return None

    def metric(self, name: str, labels: str = "") -> float:
        """The sum of a metric's samples (whose label set contains `labels`), 0 when absent."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith(name) and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                if series.split("{")[0] == name and labels in series:
                    total += float(value)
        return total

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies mid-reconcile."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, as the kubelet does; SIGKILL after the grace period."""
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None

    def _status_kib(self, field: str) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.proc.pid}/status")

    def rss_bytes(self) -> int:
        return self._status_kib("VmRSS") * 1024

    def peak_rss_bytes(self) -> int:
        """The kernel's high-water mark of the resident memory (VmHWM): no sampling to miss it."""
        return self._status_kib("VmHWM") * 1024

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
