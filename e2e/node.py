"""A real node for the local e2e cluster: kubelet, kube-proxy, containerd, a CNI bridge, CoreDNS.

kwok nodes run no containers; this one does. `up` joins a kubelet and kube-proxy (built from the
pinned Kubernetes by e2e/tools/build.sh) to the control plane of e2e/cluster.py, with Debian's
containerd, runc and CNI plugins (bridge, host-local, portmap, loopback), kube-proxy in iptables
mode for Services, and CoreDNS (built from Go modules) answering behind the usual `kube-dns`
Service. The node is labelled and tainted `e2e.lmcache.ai/real-node`, so only pods that tolerate
the taint land there, and it advertises `nvidia.com/gpu` as a plain extended resource (no device:
the engine pods ask for a GPU as on a GPU cluster, the stand-in for vLLM computes on the CPU).
Its images come from e2e/images.py: no registry is reachable.

Identities are real: the kubelet is `system:node:<name>` (Node authorizer, NodeRestriction),
kube-proxy `system:kube-proxy`, CoreDNS its own user with a read-only ClusterRole; the kubelet
serves its API to the apiserver's client certificate only.

What `up` changes on the host and `down` puts back: the processes it starts (stopped by recorded
pid), `vm.nr_hugepages` (raised by HUGEPAGES, lowered by as much), the kernel tunables the kubelet
and the bridge plugin set, the cgroup v1 hugetlb hierarchy (mounted so that pod hugepage limits
are enforced on this cgroup-v1-hybrid machine), the kubelet's and kube-proxy's iptables chains,
the bridge, IPAM leases, pod network namespaces and mounts, the `kubepods` cgroups. One real node
per machine: kube-proxy's and the kubelet's iptables chains are host-wide (HOST_RECORD says whose).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from e2e import cluster, images

NAME = "e2e-real-node"
LABEL = "e2e.lmcache.ai/real-node"
TAINT = {"key": LABEL, "value": "true", "effect": "NoSchedule"}
TOLERATION = {"key": LABEL, "operator": "Exists", "effect": "NoSchedule"}
NODE_DIR = cluster.E2E_DIR / "node"
RUN_DIR = Path("/run/lmcache-e2e-node")  # containerd's state (sockets of shims, tmpfs)
HOST_RECORD = Path("/run/lmcache-e2e-real-node.json")  # which checkout's node this machine runs
HUGEPAGES = 160  # 2 MiB pages added to vm.nr_hugepages for the node's pods (320 MiB)
GPUS = "4"  # `nvidia.com/gpu` slots the node advertises (extended resource, no device)
DNS_SERVICE_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
CNI_NETWORK = "lmcache-e2e"
BRIDGE = "cni-e2e0"
POD_SUBNETS = ("10.89.0.0/16", "10.90.0.0/16", "10.91.0.0/16")  # 10.88/16 is podman's
CNI_BIN = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
# Kernel tunables the kubelet (without protectKernelDefaults) and the bridge plugin set.
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
)
HUGETLB_V1 = Path("/sys/fs/cgroup/hugetlb")
MODE_ENV = "E2E_REAL_NODE"  # auto (default): join when the machine can; 1: must; 0: never


class NodeError(cluster.ClusterError):
    """The real node could not be started, or a prerequisite is missing (named, with the fix)."""


@dataclass
class NodeState:
    """What `down` needs to undo `up`, and what the tests read (node IP, image tags)."""

    node_ip: str = ""
    pod_cidr: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    exes: dict[str, str] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)
    hugepages_added: int = 0
    mounted_hugetlb: bool = False
    kube_chains_before: list[str] = field(default_factory=list)

    @classmethod
    def load(cls) -> NodeState | None:
        path = NODE_DIR / "state.json"
        return cls(**json.loads(path.read_text())) if path.exists() else None

    def save(self) -> None:
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        (NODE_DIR / "state.json").write_text(json.dumps(asdict(self), indent=1))


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto").lower()
    aliases = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}
    value = aliases.get(value, value)
    if value not in ("auto", "on", "off"):
        raise NodeError(f"{MODE_ENV}={value!r}: allowed are auto, 1 (required), 0 (off)")
    return value


def why_not() -> str | None:
    """None when `up` should start the node; else why not (E2E_REAL_NODE=1 makes it an error)."""
    wanted = mode()
    if wanted == "off":
        return f"{MODE_ENV}=0"
    reasons = prerequisites()
    if other := other_node():
        reasons.append(f"a real node from {other} runs on this machine (one per machine)")
    if not reasons:
        return None
    reason = "this machine lacks: " + "; ".join(reasons)
    if wanted == "on":
        raise NodeError(f"{MODE_ENV}=1 but {reason}")
    return reason


def skipped_reason() -> str | None:
    """Why the running cluster has no real node (written by `up`), or None."""
    path = cluster.STATE / "real-node-skipped"
    return path.read_text().strip() if path.exists() else None


def run(*cmd: str, check: bool = True, input: str | None = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, input=input, check=False)
    if check and out.returncode != 0:
        raise NodeError(f"`{' '.join(cmd)}` exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout


def sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name


# --- prerequisites ------------------------------------------------------------------------------


def prerequisites() -> list[str]:
    """What this machine lacks for a real node, each with the fix."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the kubelet, containerd and kube-proxy need it)")
    for tool in ("kubelet", "kube-proxy", "coredns"):
        if not os.access(cluster.BIN / tool, os.X_OK):
            missing.append(f"{cluster.BIN / tool} (make e2e-tools)")
    for binary in ("containerd", "ctr", "runc", "iptables", "ip"):
        if shutil.which(binary) is None:
            missing.append(f"{binary} (apt-get install containerd runc iptables iproute2)")
    for plugin in CNI_PLUGINS:
        if not (CNI_BIN / plugin).exists():
            missing.append(f"{CNI_BIN / plugin} (apt-get install containernetworking-plugins)")
    if not any(shutil.which(b) for b in ("podman", "buildah", "docker")):
        missing.append("an image builder (apt-get install podman, or buildah)")
    if not images.rootfs_path().exists() and shutil.which("mmdebstrap") is None:
        missing.append("mmdebstrap (apt-get install mmdebstrap), for the images' Debian rootfs")
    if "hugetlb" not in Path("/proc/cgroups").read_text():
        missing.append("the hugetlb cgroup controller (kernel CONFIG_CGROUP_HUGETLB)")
    return missing


def other_node() -> str | None:
    """The checkout whose real node runs on this machine, if it is not ours and still alive."""
    if not HOST_RECORD.exists():
        return None
    record = json.loads(HOST_RECORD.read_text())
    if Path(record["node_dir"]) == NODE_DIR.resolve():
        return None
    if any(cluster.alive(pid) for pid in record.get("pids", [])):
        return str(record["node_dir"])
    return None


# --- bring-up -----------------------------------------------------------------------------------


def node_ip() -> str:
    """The default route's interface address: the node's InternalIP (the kubelet refuses
    loopback), where the apiserver reaches the kubelet and pods reach the apiserver."""
    route = run("ip", "-4", "-j", "route", "show", "default")
    routes = json.loads(route or "[]")
    if not routes:
        raise NodeError("no IPv4 default route: the node needs an address pods can reach")
    addrs = json.loads(run("ip", "-4", "-j", "addr", "show", "dev", routes[0]["dev"]))
    return str(addrs[0]["addr_info"][0]["local"])


def pod_subnet() -> str:
    """The first candidate subnet no route on this host overlaps (podman owns 10.88/16)."""
    routes = json.loads(run("ip", "-4", "-j", "route", "show", "table", "all") or "[]")
    taken = []
    for r in routes:
        with contextlib.suppress(ValueError):
            taken.append(ipaddress.ip_network(r["dst"], strict=False))
    for candidate in POD_SUBNETS:
        net = ipaddress.ip_network(candidate)
        if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
            return candidate
    raise NodeError(f"every pod subnet candidate {POD_SUBNETS} overlaps a route on this host")


def iptables_kube_chains() -> list[str]:
    """`<tool> <table> <chain>` of every KUBE-* chain on the host."""
    chains = []
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            out = run(tool, "-t", table, "-S", check=False)
            chains += [f"{tool} {table} {c}" for c in re.findall(r"^-N (KUBE-\S+)", out, re.M)]
    return chains


def write_pki(state: NodeState) -> None:
    """Client certificates for the node's components, from the cluster's CA."""
    pki = cluster.STATE / "pki"
    server = f"https://127.0.0.1:{cluster.State.load().ports['apiserver']}"  # type: ignore[union-attr]
    for user, subject in (
        ("node", f"/O=system:nodes/CN=system:node:{NAME}"),
        ("kube-proxy", "/CN=system:kube-proxy"),
        ("coredns", f"/CN={cluster.COREDNS_USER}"),
    ):
        cluster.leaf(pki, user, subject, "clientAuth")
        (NODE_DIR / f"{user}.kubeconfig").write_text(cluster.kubeconfig(server, pki, user))


def containerd_config(state: NodeState) -> str:
    sock = NODE_DIR / "containerd.sock"
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{NODE_DIR / "containerd"}"
state = "{RUN_DIR / "containerd"}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[{cri}]
  sandbox_image = "{state.images["pause"]}"
  # No CAP_SYS_RESOURCE here: clamp the kubelet's negative oom_score_adj instead of failing.
  restrict_oom_score_adj = true
  # Pod hugepage limits, enforced through the v1 hugetlb hierarchy `up` mounts.
  disable_hugetlb_controller = false
  disable_apparmor = true
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{NODE_DIR / "cni"}"
    max_conf_num = 1
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{shutil.which("runc")}"
"""


def cni_config(state: NodeState) -> dict[str, object]:
    gateway = str(next(ipaddress.ip_network(state.pod_cidr).hosts()))
    return {
        "cniVersion": "0.4.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,  # pods talk to the cluster only
                "hairpinMode": True,  # a pod reaching itself through its own Service
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": state.pod_cidr, "gateway": gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(NODE_DIR / "cni-ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "loopback"},
        ],
    }


def kubelet_config(state: NodeState) -> dict[str, object]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,  # this machine is cgroup v1 hybrid
        "cgroupDriver": "cgroupfs",  # containerd 1.6 cannot tell the kubelet (no RuntimeConfig)
        "containerRuntimeEndpoint": f"unix://{NODE_DIR / 'containerd.sock'}",
        "address": state.node_ip,
        "port": state.ports["kubelet"],
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": state.ports["kubelet-healthz"],
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(cluster.STATE / "pki" / "ca.crt")},
        },
        "authorization": {"mode": "AlwaysAllow"},  # whoever the cluster CA vouched for
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": [DNS_SERVICE_IP],
        "resolvConf": "/etc/resolv.conf",
        "failSwapOn": False,
        "oomScoreAdj": 0,  # -999 needs CAP_SYS_RESOURCE
        "podLogsDir": str(NODE_DIR / "pod-logs"),
        "serializeImagePulls": False,
        # A shared disk: do not evict the tests' pods, or collect their images, because other
        # work fills it (percentages of a large, thinly provisioned disk bite early).
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "256Mi",
            "imagefs.available": "256Mi",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "maxPods": 40,
        "registerWithTaints": [TAINT],
    }


def kube_proxy_config(state: NodeState) -> dict[str, object]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(NODE_DIR / "kube-proxy.kubeconfig")},
        "hostnameOverride": NAME,
        "clusterCIDR": state.pod_cidr,
        "bindAddress": "127.0.0.1",
        "healthzBindAddress": f"127.0.0.1:{state.ports['kube-proxy-healthz']}",
        "metricsBindAddress": f"127.0.0.1:{state.ports['kube-proxy-metrics']}",
        # Leave the host's conntrack tunables and route_localnet alone.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        "iptables": {"localhostNodePorts": False},
    }


def corefile(state: NodeState) -> str:
    return f""".:{state.ports["dns"]} {{
    bind {state.node_ip}
    errors
    ready 127.0.0.1:{state.ports["dns-ready"]}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {NODE_DIR / "coredns.kubeconfig"}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 30
}}
"""


def dns_objects(state: NodeState) -> list[dict[str, object]]:
    """CoreDNS's read-only RBAC, and the `kube-dns` Service pods resolve through: ClusterIP
    DNS_SERVICE_IP, its endpoint CoreDNS on the node IP (a host process, on a free port)."""
    user = role = cluster.COREDNS_USER
    ports = [("dns", "UDP"), ("dns-tcp", "TCP")]
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": role},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["services", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": role},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role,
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system"},
            "spec": {
                "clusterIP": DNS_SERVICE_IP,
                "ports": [{"name": n, "port": 53, "protocol": p} for n, p in ports],
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kube-dns-e2e",
                "namespace": "kube-system",
                "labels": {
                    "kubernetes.io/service-name": "kube-dns",
                    "endpointslice.kubernetes.io/managed-by": "lmcache-e2e",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [state.node_ip], "conditions": {"ready": True}}],
            "ports": [{"name": n, "port": state.ports["dns"], "protocol": p} for n, p in ports],
        },
    ]


def start(state: NodeState, name: str, cmd: list[str]) -> None:
    state.pids[name] = cluster.spawn(name, cmd)
    state.exes[name] = str(Path(cmd[0]).resolve())
    state.save()


def wait_http(state: NodeState, name: str, url: str, timeout: float) -> None:
    def ok() -> bool:
        if not cluster.alive(state.pids[name]):
            raise NodeError(f"{name} exited during startup:\n{cluster.log_tail(name)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    cluster.wait_until(f"{name} at {url}", ok, timeout)


def ctr(*args: str, check: bool = True, input_file: int | None = None) -> str:
    cmd = ["ctr", "--address", str(NODE_DIR / "containerd.sock"), "-n", "k8s.io", *args]
    if input_file is None:
        return run(*cmd, check=check)
    proc = subprocess.run(cmd, stdin=input_file, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NodeError(f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def containerd_up() -> bool:
    cmd = ["ctr", "--address", str(NODE_DIR / "containerd.sock"), "version"]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def import_images(state: NodeState) -> None:
    """The node's images into containerd (a tag already there is kept: containerd's store under
    NODE_DIR survives `down`), streamed from the builder's store. The kubelet may also have
    collected one under disk pressure: then it is imported again."""
    have = set(ctr("images", "ls", "-q").split())
    wanted = {state.images[name] for name in images.NODE_IMAGES}
    stale = [ref for ref in have if ref.startswith(images.REGISTRY + "/") and ref not in wanted]
    if stale:  # earlier builds: their snapshots go with them (containerd's GC)
        ctr("images", "rm", *stale, check=False)
    for name in images.NODE_IMAGES:
        ref = state.images[name]
        if ref in have:
            continue
        images.log(f"importing {ref} into the node's containerd")
        save = subprocess.Popen(
            [str(images.BUILD), "save", ref], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert save.stdout is not None
        try:
            ctr("images", "import", "-", input_file=save.stdout.fileno())
        finally:
            save.stdout.close()
            _, err = save.communicate()
        if save.returncode != 0:
            raise NodeError(f"exporting {ref}: {err.decode(errors='replace')}")
        discard_layers(ref)


def discard_layers(ref: str) -> None:
    """Drop an imported image's layer blobs, as containerd's discard_unpacked_layers does for
    pulled ones: containers run from the unpacked snapshots, and the engine image's layers would
    double its gigabytes on disk."""
    listing = ctr("images", "ls", f"name=={ref}").splitlines()
    digest = listing[1].split()[2]
    manifest = json.loads(ctr("content", "get", digest))
    for layer in manifest.get("layers", []):
        ctr("content", "rm", layer["digest"], check=False)


def host_changes(state: NodeState) -> None:
    """Save what the node changes on the host, then make its own changes."""
    state.sysctls = {
        name: sysctl_path(name).read_text().strip()
        for name in SYSCTLS
        if sysctl_path(name).exists()
    }
    state.kube_chains_before = iptables_kube_chains()
    state.save()
    nr = sysctl_path("vm/nr_hugepages")
    nr.write_text(str(int(nr.read_text()) + HUGEPAGES))
    state.hugepages_added = HUGEPAGES
    state.save()
    v1_mounts = Path("/proc/mounts").read_text()
    if not re.search(r" cgroup \S*hugetlb", v1_mounts) and Path("/sys/fs/cgroup/unified").is_dir():
        # cgroup v1 hybrid: hugetlb sits unused in the v2 hierarchy, where the kubelet does not
        # look; bound to a v1 hierarchy, pod hugepage limits are enforced.
        HUGETLB_V1.mkdir(exist_ok=True)
        run("mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", str(HUGETLB_V1))
        state.mounted_hugetlb = True
        state.save()


def up(timeout: float = 120.0) -> NodeState:
    """Join the real node to the running control plane (`why_not()` said it can); return once
    it is Ready with DNS."""
    started = time.monotonic()
    shutil.rmtree(NODE_DIR / "kubelet", ignore_errors=True)
    for d in ("cni", "cni-ipam", "pod-logs", "kubelet"):
        (NODE_DIR / d).mkdir(parents=True, exist_ok=True)
    # A bridge left by a node whose run was killed (why_not() found no live node here) would keep
    # its old address: the subnet choice would avoid it and the CNI plugin then fail on it.
    run("ip", "link", "delete", BRIDGE, check=False)
    state = NodeState(node_ip=node_ip(), pod_cidr=pod_subnet())
    ports = ("kubelet", "kubelet-healthz", "kube-proxy-healthz", "kube-proxy-metrics")
    state.ports = {p: cluster.free_port() for p in (*ports, "dns", "dns-ready")}
    state.save()
    HOST_RECORD.write_text(json.dumps({"node_dir": str(NODE_DIR.resolve()), "pids": []}))
    state.images = images.ensure_all()
    state.save()
    host_changes(state)
    write_pki(state)
    (NODE_DIR / "containerd.toml").write_text(containerd_config(state))
    (NODE_DIR / "cni" / "10-lmcache-e2e.conflist").write_text(json.dumps(cni_config(state)))
    (NODE_DIR / "kubelet.json").write_text(json.dumps(kubelet_config(state)))
    (NODE_DIR / "kube-proxy.json").write_text(json.dumps(kube_proxy_config(state)))
    (NODE_DIR / "Corefile").write_text(corefile(state))

    RUN_DIR.mkdir(parents=True, exist_ok=True)
    start(
        state,
        "containerd",
        [shutil.which("containerd") or "containerd", "--config", str(NODE_DIR / "containerd.toml")],
    )
    record_host(state)
    cluster.wait_until("containerd", containerd_up, timeout)
    import_images(state)

    cluster.kubectl(
        "apply",
        "--server-side",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": dns_objects(state)}),
    )
    start(state, "coredns", [str(cluster.BIN / "coredns"), "-conf", str(NODE_DIR / "Corefile")])
    start(
        state,
        "kubelet",
        [
            str(cluster.BIN / "kubelet"),
            f"--config={NODE_DIR / 'kubelet.json'}",
            f"--kubeconfig={NODE_DIR / 'node.kubeconfig'}",
            f"--root-dir={NODE_DIR / 'kubelet'}",
            f"--hostname-override={NAME}",
            f"--node-ip={state.node_ip}",
            f"--node-labels={LABEL}=true",
        ],
    )
    start(
        state,
        "kube-proxy",
        [str(cluster.BIN / "kube-proxy"), f"--config={NODE_DIR / 'kube-proxy.json'}"],
    )
    record_host(state)
    wait_http(state, "coredns", f"http://127.0.0.1:{state.ports['dns-ready']}/ready", timeout)
    wait_http(
        state, "kubelet", f"http://127.0.0.1:{state.ports['kubelet-healthz']}/healthz", timeout
    )
    wait_http(
        state,
        "kube-proxy",
        f"http://127.0.0.1:{state.ports['kube-proxy-healthz']}/healthz",
        timeout,
    )
    cluster.wait_until(f"node {NAME} Ready", ready, timeout)
    # The GPU slots the engine pods request: an extended resource, as a device plugin would add.
    patch = [{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": GPUS}]
    cluster.kubectl(
        "patch", "node", NAME, "--subresource=status", "--type=json", "-p", json.dumps(patch)
    )
    cluster.wait_until("the GPU slots allocatable (kubelet)", gpus_allocatable, timeout)
    (NODE_DIR / "startup-seconds").write_text(f"{time.monotonic() - started:.1f}\n")
    return state


def ready() -> bool:
    try:
        node = json.loads(cluster.kubectl("get", "node", NAME, "-o", "json"))
    except cluster.ClusterError:
        return False
    conditions = node["status"].get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def gpus_allocatable() -> bool:
    node = json.loads(cluster.kubectl("get", "node", NAME, "-o", "json"))
    return bool(node["status"]["allocatable"].get("nvidia.com/gpu") == GPUS)


def record_host(state: NodeState) -> None:
    HOST_RECORD.write_text(
        json.dumps({"node_dir": str(NODE_DIR.resolve()), "pids": list(state.pids.values())})
    )


def running() -> NodeState | None:
    """The node's state while its kubelet runs, else None."""
    state = NodeState.load()
    if state is None or not all(ours(state, n) for n in ("containerd", "kubelet", "kube-proxy")):
        return None
    return state


# --- tear-down ----------------------------------------------------------------------------------


def ours(state: NodeState, name: str) -> bool:
    """The recorded pid still runs the recorded binary: never signal a reused pid."""
    pid = state.pids.get(name)
    if pid is None:
        return False
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return cluster.alive(pid) and exe == state.exes.get(name)


def stop(state: NodeState, name: str, timeout: float = 20.0) -> None:
    if ours(state, name):
        pid = state.pids[name]
        os.killpg(pid, signal.SIGTERM)
        try:
            cluster.wait_until(f"{name} to exit", lambda: not cluster.alive(pid), timeout)
        except cluster.ClusterError:
            os.killpg(pid, signal.SIGKILL)
            cluster.wait_until(f"{name} to die", lambda: not cluster.alive(pid), 10)
    state.pids.pop(name, None)
    state.save()


def kubectl(*args: str) -> str:
    """kubectl with a deadline: `down` must finish even when the API server hangs."""
    return cluster.kubectl("--request-timeout=10s", *args)


def drain(timeout: float) -> None:
    """Cordon, delete every pod bound to the node, and wait until the kubelet has removed them
    (it tears down their sandboxes, networks and volumes itself)."""
    selector = f"--field-selector=spec.nodeName={NAME}"
    with contextlib.suppress(cluster.ClusterError):
        kubectl("cordon", NAME)
        kubectl("delete", "pods", "-A", selector, "--wait=false", "--grace-period=1")
        cluster.wait_until(
            f"pods on {NAME} gone",
            lambda: not kubectl("get", "pods", "-A", selector, "-o", "name").strip(),
            timeout,
        )
        cluster.wait_until(
            "pod sandboxes stopped",
            lambda: not ctr("tasks", "ls", "-q", check=False).strip(),
            timeout,
        )


def remove_leftover_containers() -> None:
    """What the kubelet did not clean up (it was killed, or the API was gone): containerd's
    tasks and containers, and the network namespaces of their sandboxes."""
    netns = set()
    for cid in ctr("containers", "ls", "-q", check=False).split():
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            spec = json.loads(ctr("containers", "info", "--spec", cid, check=False))
            for ns in spec["linux"]["namespaces"]:
                if ns["type"] == "network" and ns.get("path"):
                    netns.add(ns["path"])
    for task in ctr("tasks", "ls", "-q", check=False).split():
        ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
    deadline = time.monotonic() + 10
    while ctr("tasks", "ls", "-q", check=False).strip() and time.monotonic() < deadline:
        for task in ctr("tasks", "ls", "-q", check=False).split():
            ctr("tasks", "delete", task, check=False)
        time.sleep(0.2)
    for cid in ctr("containers", "ls", "-q", check=False).split():
        ctr("containers", "delete", cid, check=False)
    for path in netns:
        run("umount", path, check=False)
        Path(path).unlink(missing_ok=True)


def unmount_under(*prefixes: Path) -> None:
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for m in sorted(
        (m for m in mounts if any(m.startswith(f"{p}/") for p in prefixes)), reverse=True
    ):
        if run("umount", m, check=False) == "" and m in Path("/proc/mounts").read_text():
            run("umount", "-l", m, check=False)


def remove_kube_chains(before: list[str]) -> None:
    """The KUBE-* chains the kubelet and kube-proxy made (jumps into them first)."""
    made = [c.split() for c in iptables_kube_chains() if c not in before]
    for tool, table, chain in made:
        for rule in run(tool, "-t", table, "-S", check=False).splitlines():
            words = shlex.split(rule)
            if words[:1] == ["-A"] and words[-2:] == ["-j", chain]:
                run(tool, "-t", table, "-D", *words[1:], check=False)
    for tool, table, chain in made:
        run(tool, "-t", table, "-F", chain, check=False)
    for tool, table, chain in made:
        run(tool, "-t", table, "-X", chain, check=False)


def remove_kubepods_cgroups() -> None:
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        root = hierarchy / "kubepods"
        if root.is_dir():
            for d in sorted(
                (p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
            ):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()


def down(timeout: float = 90.0) -> None:
    """Undo `up`, whatever stage it reached; the cluster's API may already be gone."""
    state = NodeState.load()
    if state is None:
        return
    if ours(state, "kubelet") and ours(state, "containerd"):
        drain(timeout)
    stop(state, "kube-proxy")
    run(str(cluster.BIN / "kube-proxy"), "--cleanup", check=False)
    stop(state, "kubelet")
    stop(state, "coredns")
    with contextlib.suppress(cluster.ClusterError):
        kubectl("delete", "node", NAME, "--ignore-not-found")
    if ours(state, "containerd"):
        remove_leftover_containers()
    stop(state, "containerd")
    for sock in ("containerd.sock", "containerd.sock.ttrpc"):
        (NODE_DIR / sock).unlink(missing_ok=True)
    unmount_under(NODE_DIR.resolve(), RUN_DIR)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    remove_kube_chains(state.kube_chains_before)
    run("ip", "link", "delete", BRIDGE, check=False)
    shutil.rmtree(NODE_DIR / "cni-ipam", ignore_errors=True)
    for cached in Path("/var/lib/cni/results").glob(f"{CNI_NETWORK}-*"):
        cached.unlink()
    remove_kubepods_cgroups()
    if state.mounted_hugetlb:
        run("umount", str(HUGETLB_V1), check=False)
        with contextlib.suppress(OSError):
            HUGETLB_V1.rmdir()
    for name, value in state.sysctls.items():
        with contextlib.suppress(OSError):
            sysctl_path(name).write_text(value)
    if state.hugepages_added:
        nr = sysctl_path("vm/nr_hugepages")
        nr.write_text(str(max(0, int(nr.read_text()) - state.hugepages_added)))
    (NODE_DIR / "state.json").unlink()
    if HOST_RECORD.exists() and json.loads(HOST_RECORD.read_text())["node_dir"] == str(
        NODE_DIR.resolve()
    ):
        HOST_RECORD.unlink()


def refresh_images() -> dict[str, str]:
    """Build what changed; a running node imports it (its pods pick it up when recreated)."""
    refs = images.ensure_all()
    state = running()
    if state is not None:
        state.images = refs
        state.save()
        import_images(state)
    return refs


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["images"]:
        sys.exit("usage: python -m e2e.node images")
    try:
        print(json.dumps(refresh_images(), indent=2))
    except (cluster.ClusterError, images.ImageError) as e:
        sys.exit(f"e2e node: {e}")
