"""A local Kubernetes control plane for the e2e tests, made of real upstream binaries.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the kwok controller run as
local processes on free ports; kwok plays the kubelet for fake Nodes that advertise
`nvidia.com/gpu` and `hugepages-2Mi` in several shapes, so scheduling, readiness, rollouts and
garbage collection are the real thing while no container runs there. Beside them, where the
machine allows it, a real node (e2e/node.py: kubelet, containerd) runs real containers.

Stdlib only (plus `openssl` and the binaries from `make e2e-tools`), so `make e2e-up` works before
anything else is installed. Usage: `python -m e2e.cluster up|down|status`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
E2E_DIR = Path(os.environ.get("E2E_DIR", REPO / ".e2e"))
BIN = Path(os.environ.get("E2E_BIN", E2E_DIR / "bin"))
STATE = E2E_DIR / "cluster"
KUBECONFIG = E2E_DIR / "kubeconfig"

SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"
FAKE_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
SHAPE_LABEL = "e2e.lmcache.ai/shape"
ADMIN_USER = "lmcache-e2e-admin"
COREDNS_USER = "lmcache-e2e:coredns"  # the real node's cluster DNS (e2e/node.py)

# Users whose requests are not audited: the control plane's own chatter (leases, heartbeats,
# controllers). Everything else (the operator, helm, the tests) lands in the audit log.
QUIET_USERS = [
    "system:kube-controller-manager",
    "system:kube-scheduler",
    "system:apiserver",
    "kwok",
    "system:kube-proxy",  # the real node's (e2e/node.py), like its kubelet in system:nodes
    COREDNS_USER,
]
QUIET_GROUPS = ["system:serviceaccounts:kube-system", "system:nodes"]


@dataclass(frozen=True)
class NodeShape:
    """A fake node: what the scheduler sees in capacity/allocatable."""

    name: str
    gpus: int
    hugepages_2mi: str | None
    cpu: str
    memory: str
    gpu_product: str = ""

    def resources(self) -> dict[str, str]:
        res = {"cpu": self.cpu, "memory": self.memory, "pods": "110", "ephemeral-storage": "1Ti"}
        if self.gpus:
            res["nvidia.com/gpu"] = str(self.gpus)
        if self.hugepages_2mi:
            res["hugepages-2Mi"] = self.hugepages_2mi
        return res


H100 = "NVIDIA-H100-80GB-HBM3"  # the product label GPU feature discovery sets; examples select it
# Several shapes, including a GPU node without hugepages and a CPU-only node, so tests can tell
# "scheduled because of hugepages" from "scheduled anywhere".
NODE_SHAPES = [
    NodeShape("gpu-8x-hp64g", 8, "64Gi", cpu="96", memory="1Ti", gpu_product=H100),
    NodeShape("gpu-2x-hp8g", 2, "8Gi", cpu="32", memory="256Gi", gpu_product="NVIDIA-L4"),
    NodeShape("gpu-4x-nohp", 4, None, cpu="64", memory="512Gi", gpu_product=H100),
    NodeShape("cpu-only", gpus=0, hugepages_2mi="16Gi", cpu="32", memory="128Gi"),
]
MAX_NODE_HUGEPAGES_GI = 64

# Volumes come from the controller-manager's in-tree hostPath provisioner (paths under /tmp, never
# written to: no kubelet runs). "standard" is the default class; "local-nvme" is the class the
# disk-tier example asks for.
STORAGE_CLASSES = {"standard": True, "local-nvme": False}


class ClusterError(RuntimeError):
    """The local cluster could not be started or is not running."""


@dataclass
class State:
    """What `down`/`status` and a reusing test session need: ports and process ids."""

    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls) -> State | None:
        path = STATE / "state.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return cls(ports=raw["ports"], pids=raw["pids"])

    def save(self) -> None:
        (STATE / "state.json").write_text(json.dumps({"ports": self.ports, "pids": self.pids}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool(name: str) -> str:
    path = BIN / name
    if not os.access(path, os.X_OK):
        raise ClusterError(f"{path} is missing: run `make e2e-tools` first")
    return str(path)


def run(cmd: list[str], **kwargs: object) -> None:
    subprocess.run(cmd, check=True, capture_output=True, **kwargs)  # type: ignore[call-overload]


def wait_until(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
    """Poll `check` until it is true; a condition with a deadline, never a blind sleep."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --- certificates -----------------------------------------------------------------------------


EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def make_pki(pki: Path) -> None:
    """A CA, the apiserver's serving cert, client certs per component, the service-account key."""
    pki.mkdir(parents=True)
    ca = [
        "-x509",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "30",
        "-subj",
        "/CN=lmcache-e2e-ca",
    ]
    run(["openssl", "req", *EC_KEY, *ca], cwd=pki)
    sans = ["IP:127.0.0.1", "IP:10.96.0.1", "DNS:localhost", "DNS:kubernetes"]
    sans += ["DNS:kubernetes.default", "DNS:kubernetes.default.svc"]
    sans += ["DNS:kubernetes.default.svc.cluster.local"]
    leaf(pki, "apiserver", "/CN=kube-apiserver", "serverAuth", sans)
    leaf(pki, "admin", f"/O=system:masters/CN={ADMIN_USER}", "clientAuth")
    leaf(pki, "controller-manager", "/CN=system:kube-controller-manager", "clientAuth")
    leaf(pki, "scheduler", "/CN=system:kube-scheduler", "clientAuth")
    # kwok acts for every fake kubelet (node status, leases, pod status): cluster-admin is simplest.
    leaf(pki, "kwok", "/O=system:masters/CN=kwok", "clientAuth")
    # The apiserver's identity towards a real kubelet (logs, exec, port-forward).
    leaf(pki, "kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", "clientAuth")
    run(["openssl", "genrsa", "-out", "sa.key", "2048"], cwd=pki)
    run(["openssl", "rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"], cwd=pki)


def leaf(pki: Path, name: str, subject: str, usage: str, sans: list[str] | None = None) -> None:
    ext = [f"extendedKeyUsage={usage}", "keyUsage=critical,digitalSignature,keyEncipherment"]
    if sans:
        ext.append("subjectAltName=" + ",".join(sans))
    (pki / f"{name}.ext").write_text("\n".join(ext) + "\n")
    csr = ["-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject]
    run(["openssl", "req", *EC_KEY, *csr], cwd=pki)
    sign = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "30"]
    sign += ["-in", f"{name}.csr", "-out", f"{name}.crt", "-extfile", f"{name}.ext"]
    run(["openssl", "x509", "-req", *sign], cwd=pki)


def kubeconfig(server: str, pki: Path, user: str) -> str:
    """A self-contained kubeconfig (certs inlined) so it can be copied anywhere."""

    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "lmcache-e2e",
                    "cluster": {"server": server, "certificate-authority-data": b64("ca.crt")},
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate-data": b64(f"{user}.crt"),
                        "client-key-data": b64(f"{user}.key"),
                    },
                }
            ],
            "contexts": [
                {"name": "lmcache-e2e", "context": {"cluster": "lmcache-e2e", "user": user}}
            ],
            "current-context": "lmcache-e2e",
        },
        indent=2,
    )


# --- processes --------------------------------------------------------------------------------


def spawn(name: str, cmd: list[str]) -> int:
    """Start a component in its own session, so `down` can stop its whole group; log to a file."""
    logs = STATE / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc.pid


def alive(pid: int) -> bool:
    """True while `pid` runs and is not a zombie (a child of this process that already exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ours(pid: int) -> bool:
    """True when `pid` still runs one of our binaries: never signal a reused pid."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return alive(pid) and Path(exe).resolve() in {p.resolve() for p in BIN.iterdir()}


def log_tail(name: str, lines: int = 30) -> str:
    path = STATE / "logs" / f"{name}.log"
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_healthy(name: str, pid: int, url: str, ctx: ssl.SSLContext | None, timeout: float) -> None:
    """Poll a health endpoint; fail at once, with the log's tail, if the process died."""

    def check() -> bool:
        if not alive(pid):
            raise ClusterError(f"{name} exited during startup; last log lines:\n{log_tail(name)}")
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    try:
        wait_until(f"{name} at {url}", check, timeout)
    except ClusterError as e:
        raise ClusterError(f"{e}\nlast log lines of {name}:\n{log_tail(name)}") from None


def insecure_ctx() -> ssl.SSLContext:
    """For the self-signed serving certs of controller-manager and scheduler health checks."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def admin_ctx(pki: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "None", "users": QUIET_USERS},
        {"level": "None", "userGroups": QUIET_GROUPS},
        {"level": "Metadata"},
    ],
}


def up(timeout: float = 120.0) -> State:
    """Start the control plane and the fake nodes, and the real node where the machine can run
    one (E2E_REAL_NODE); return once the cluster schedules pods."""
    from e2e import node  # e2e.node builds on this module

    started = time.monotonic()
    existing = State.load()
    if existing and any(alive(p) for p in existing.pids.values()):
        raise ClusterError(f"a cluster is already running (pids in {STATE}): run `make e2e-down`")
    node.down()  # what a killed run left behind
    shutil.rmtree(STATE, ignore_errors=True)
    STATE.mkdir(parents=True)
    skip = node.why_not()
    if skip:
        (STATE / "real-node-skipped").write_text(skip + "\n")
        print(f"e2e cluster: no real node: {skip}", file=sys.stderr)
    pki = STATE / "pki"
    make_pki(pki)
    state = State(
        ports={n: free_port() for n in ("etcd", "etcd-peer", "apiserver", "cm", "sched", "kwok")}
    )
    server = f"https://127.0.0.1:{state.ports['apiserver']}"
    for user in ("admin", "controller-manager", "scheduler", "kwok"):
        (STATE / f"{user}.kubeconfig").write_text(kubeconfig(server, pki, user))
    (STATE / "audit-policy.json").write_text(json.dumps(AUDIT_POLICY))

    try:
        start_components(state, pki, timeout, real_node=not skip)
        create_nodes(timeout)
        if not skip:
            node.up(timeout)
    except BaseException:
        state.save()
        down()
        raise
    KUBECONFIG.write_text((STATE / "admin.kubeconfig").read_text())
    (STATE / "startup-seconds").write_text(f"{time.monotonic() - started:.1f}\n")
    return state


def start_components(state: State, pki: Path, timeout: float, real_node: bool) -> None:
    p = state.ports
    etcd_url = f"http://127.0.0.1:{p['etcd']}"
    peer_url = f"http://127.0.0.1:{p['etcd-peer']}"
    state.pids["etcd"] = spawn(
        "etcd",
        [
            tool("etcd"),
            "--name=e2e",
            f"--data-dir={STATE / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=e2e={peer_url}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
    )
    state.save()
    wait_healthy("etcd", state.pids["etcd"], f"{etcd_url}/health", None, timeout)

    state.pids["apiserver"] = spawn(
        "apiserver",
        [
            tool("kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            # Pods on the real node reach it through the `kubernetes` Service: the node's address.
            f"--bind-address={'0.0.0.0' if real_node else '127.0.0.1'}",
            f"--secure-port={p['apiserver']}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-account-issuer={ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # Node: a real kubelet gets what its pods need, no more (NodeRestriction too).
            "--authorization-mode=Node,RBAC",
            # The namespace annotations that place a namespace's pods (the real-pod tests').
            "--enable-admission-plugins=NodeRestriction,PodNodeSelector,PodTolerationRestriction",
            f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--allow-privileged=true",
            f"--audit-policy-file={STATE / 'audit-policy.json'}",
            f"--audit-log-path={STATE / 'audit.log'}",
            "--audit-log-format=json",
            "--audit-log-maxsize=0",
            "--audit-log-mode=blocking",
        ],
    )
    state.save()
    api = f"https://127.0.0.1:{p['apiserver']}"
    wait_healthy("apiserver", state.pids["apiserver"], f"{api}/readyz", admin_ctx(pki), timeout)

    def component(name: str, binary: str, port: int, extra: list[str]) -> None:
        kc = STATE / f"{name}.kubeconfig"
        state.pids[name] = spawn(
            name,
            [
                tool(binary),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={STATE / name}",
                "--leader-elect=false",
                "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
                *extra,
            ],
        )
        state.save()

    component(
        "controller-manager",
        "kube-controller-manager",
        p["cm"],
        [
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=true",
            "--enable-hostpath-provisioner=true",
            "--kube-api-qps=200",
            "--kube-api-burst=400",
            # kwok renews each fake node's Lease every 30 s (a quarter of 120 s); a node is
            # NotReady (and its pods unready for good: kwok does not revive them) only after 3
            # minutes without one, so 1000 nodes on 2 busy cores do not flap (bench-operator).
            "--node-monitor-grace-period=180s",
        ],
    )
    component("scheduler", "kube-scheduler", p["sched"], [])
    state.pids["kwok"] = spawn(
        "kwok",
        [
            tool("kwok"),
            f"--kubeconfig={STATE / 'kwok.kubeconfig'}",
            f"--config={BIN / 'kwok-stages.yaml'}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={'='.join(FAKE_NODE_ANNOTATION)}",
            f"--cidr={POD_CIDR}",
            "--node-ip=10.0.0.1",
            "--node-lease-duration-seconds=120",
            f"--server-address=127.0.0.1:{p['kwok']}",
        ],
    )
    state.save()
    ctx = insecure_ctx()
    wait_healthy(
        "controller-manager",
        state.pids["controller-manager"],
        f"https://127.0.0.1:{p['cm']}/healthz",
        ctx,
        timeout,
    )
    wait_healthy(
        "scheduler",
        state.pids["scheduler"],
        f"https://127.0.0.1:{p['sched']}/healthz",
        ctx,
        timeout,
    )
    wait_healthy("kwok", state.pids["kwok"], f"http://127.0.0.1:{p['kwok']}/healthz", None, timeout)


def kubectl(*args: str, input: str | None = None) -> str:
    out = subprocess.run(
        [tool("kubectl"), f"--kubeconfig={STATE / 'admin.kubeconfig'}", *args],
        check=False,
        capture_output=True,
        text=True,
        input=input,
    )
    if out.returncode != 0:
        raise ClusterError(f"kubectl {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def node_manifest(shape: NodeShape) -> dict[str, object]:
    key, value = FAKE_NODE_ANNOTATION
    labels = {
        "kubernetes.io/hostname": shape.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        SHAPE_LABEL: shape.name,
    }
    if shape.gpus:
        labels["nvidia.com/gpu.present"] = "true"
        labels["nvidia.com/gpu.product"] = shape.gpu_product
        labels["nvidia.com/gpu.count"] = str(shape.gpus)
    res = shape.resources()
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": shape.name, "labels": labels, "annotations": {key: value}},
        "status": {"capacity": res, "allocatable": res},
    }


def storage_class(name: str, default: bool) -> dict[str, object]:
    annotations = {"storageclass.kubernetes.io/is-default-class": "true"} if default else {}
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name, "annotations": annotations},
        "provisioner": "kubernetes.io/host-path",
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }


def create(items: list[dict[str, object]]) -> None:
    kubectl(
        "create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    )


def add_nodes(shapes: list[NodeShape], timeout: float = 60.0) -> None:
    """Create fake nodes and wait until kwok reports them Ready (the benchmark adds more)."""
    create([node_manifest(s) for s in shapes])

    def nodes_ready() -> bool:
        out = json.loads(kubectl("get", "nodes", "-o", "json"))
        ready = {
            n["metadata"]["name"]
            for n in out["items"]
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in n["status"].get("conditions", [])
            )
        }
        return ready >= {s.name for s in shapes}

    wait_until("fake nodes Ready (kwok)", nodes_ready, timeout)


def create_nodes(timeout: float) -> None:
    """Create the storage classes and fake nodes; then wait until pods can be created."""
    create([storage_class(name, default) for name, default in STORAGE_CLASSES.items()])
    add_nodes(NODE_SHAPES, timeout)

    # Pods need their namespace's "default" ServiceAccount, made by the controller-manager.
    def default_sa() -> bool:
        try:
            kubectl("get", "serviceaccount", "default", "-n", "default")
        except ClusterError:
            return False
        return True

    wait_until("the default ServiceAccount (controller-manager)", default_sa, timeout)


def down(timeout: float = 30.0) -> None:
    """Stop the real node (first: it drains through the API), then every component we started
    (by recorded pid, SIGTERM then SIGKILL); keep the logs."""
    from e2e import node

    node.down()
    state = State.load()
    if state is None:
        return
    # Reverse start order: clients first, etcd last.
    for name, pid in reversed(list(state.pids.items())):
        if not ours(pid):
            continue
        os.killpg(pid, signal.SIGTERM)
        try:
            wait_until(f"{name} (pid {pid}) to exit", lambda pid=pid: not alive(pid), timeout)  # type: ignore[misc]
        except ClusterError:
            os.killpg(pid, signal.SIGKILL)
    state.pids.clear()
    state.save()
    shutil.rmtree(STATE / "etcd", ignore_errors=True)
    KUBECONFIG.unlink(missing_ok=True)


@contextmanager
def session(timeout: float = 120.0) -> Iterator[Path]:
    """The kubeconfig of a running `make e2e-up` cluster (left running), else of one started
    for the duration of the `with` block and stopped after it."""
    if running() is not None:
        yield KUBECONFIG
        return
    up(timeout)
    try:
        yield KUBECONFIG
    finally:
        down()


def running() -> State | None:
    """The state of a cluster started by `up` whose processes all still run, else None."""
    state = State.load()
    if state is None or not state.pids or not all(alive(p) for p in state.pids.values()):
        return None
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per startup wait")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(args.timeout)
            print(KUBECONFIG.read_text())
            print(
                f"# cluster up in {(STATE / 'startup-seconds').read_text().strip()} s; "
                f"export KUBECONFIG={KUBECONFIG}  (logs: {STATE / 'logs'})",
                file=sys.stderr,
            )
        elif args.command == "down":
            down()
        else:
            state = running()
            print(
                json.dumps(
                    {"running": state is not None, **({"ports": state.ports} if state else {})}
                )
            )
            return 0 if state else 1
    except ClusterError as e:
        print(f"e2e cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run as the importable module, so e2e.node (which imports it) shares its classes.
    from e2e import cluster

    sys.exit(cluster.main())
