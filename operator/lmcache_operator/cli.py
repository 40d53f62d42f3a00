"""`lmcache-operator`: run the operator in a cluster or, unchanged, from a laptop or CI job
against whatever KUBECONFIG points at."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Sequence

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from prometheus_client import start_http_server

from lmcache_operator import handlers
from lmcache_operator.controller import Controller
from lmcache_operator.kube import Cache, KubeCluster, Nodes
from lmcache_operator.leader import LeaseElector
from lmcache_operator.reconcile import Reconciler

log = logging.getLogger("lmcache_operator")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lmcache-operator", description=__doc__)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable; globs allowed)",
    )
    scope.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="watch all namespaces (the default when no --namespace is given)",
    )
    p.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, in-cluster, ~/.kube/config)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=4,
        help="concurrent reconciles: bounds the load on the API server (default 4)",
    )
    p.add_argument(
        "--resync-seconds",
        type=float,
        default=60.0,
        help="re-check every deployment this often, to catch node capacity changes "
        "(default 60; an unchanged deployment costs no writes, only a metadata read of a "
        "Secret it references)",
    )
    p.add_argument(
        "--health-port",
        type=int,
        default=8080,
        help="serve GET /healthz on this port (0 = off; default 8080)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=9090,
        help="serve Prometheus /metrics on this port (0 = off; default 9090)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        help="seconds an API request may wait for an answer (connect: at most 5); a frozen "
        "API server fails the request instead of hanging a worker (default 30)",
    )
    p.add_argument(
        "--watch-timeout",
        type=int,
        default=60,
        help="seconds the API server keeps one watch open before kopf starts the next; a "
        "watch on a dead connection is replaced after this plus --request-timeout (default 60)",
    )
    p.add_argument(
        "--reconcile-timeout",
        type=float,
        default=300.0,
        help="/healthz fails while a reconcile has run longer than this (default 300)",
    )
    p.add_argument(
        "--api-timeout",
        type=float,
        default=120.0,
        help="/healthz fails while the API server has not answered any request for this "
        "long (default 120): a restart gets fresh connections",
    )
    p.add_argument(
        "--read-nodes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="watch Nodes for the Schedulable condition and status.sizing (needs list/watch "
        "on nodes; --no-read-nodes makes Schedulable Unknown)",
    )
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--log-level", choices=("debug", "info", "warning"), default="info")
    p.add_argument(
        "--leader-election",
        action="store_true",
        help="hold a coordination.k8s.io Lease and reconcile only while holding it "
        "(run two replicas for HA)",
    )
    p.add_argument(
        "--leader-election-namespace",
        default=os.environ.get("POD_NAMESPACE"),
        help="namespace of the Lease (default $POD_NAMESPACE, else the first "
        "--namespace, else 'default')",
    )
    p.add_argument("--leader-election-name", default="lmcache-operator")
    p.add_argument(
        "--identity",
        default=f"{socket.gethostname()}-{os.getpid()}",
        help="this replica's name in the Lease (default host-pid)",
    )
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    for flag in ("request_timeout", "watch_timeout", "reconcile_timeout", "api_timeout"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0")
    return args


def api_client(kubeconfig: str | None) -> k8s.ApiClient:
    """kubeconfig when one is named (or in $KUBECONFIG), else in-cluster, else ~/.kube/config."""
    cfg = k8s.Configuration()
    # No transport-level retries: a request that times out fails once, within its deadline,
    # and the work queue retries the reconcile with backoff.
    cfg.retries = False
    if kubeconfig or os.environ.get("KUBECONFIG"):
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)
        except k8s_config.ConfigException:
            k8s_config.load_kube_config(client_configuration=cfg)
    return k8s.ApiClient(cfg)


def connection_info(cfg: k8s.Configuration) -> kopf.ConnectionInfo:
    """kopf's view of the client configuration; re-read on every login, so a rotated
    service-account token is picked up when kopf re-authenticates after a 401."""
    header = cfg.get_api_key_with_prefix("BearerToken") or ""
    scheme, _, token = header.rpartition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # so kopf's own login reads the same file
    kopf.configure(
        debug=args.log_level == "debug",
        quiet=args.log_level == "warning",
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    if args.log_level != "debug":
        # kopf logs every watch event it hands to a handler; the reconciler logs what matters.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # every /healthz probe
    cache = Cache()
    nodes = Nodes() if args.read_nodes else None
    client = api_client(args.kubeconfig)
    client.user_agent = "lmcache-operator/0.1.0"
    cluster = KubeCluster(client, cache, nodes, timeout=args.request_timeout)
    elector = None
    if args.leader_election:
        lease_ns = args.leader_election_namespace or (args.namespace or ["default"])[0]
        elector = LeaseElector(cluster, lease_ns, args.leader_election_name, args.identity)
    controller = Controller(
        Reconciler(cluster),
        cache,
        args.workers,
        args.resync_seconds,
        elector,
        reconcile_timeout=args.reconcile_timeout,
        api_timeout=args.api_timeout,
        api_silence=cluster.unanswered_for,
    )
    registry = kopf.OperatorRegistry()
    handlers.register(
        registry,
        controller,
        lambda: connection_info(client.configuration),
        request_timeout=args.request_timeout,
        watch_timeout=args.watch_timeout,
        nodes=nodes,
    )
    if args.metrics_port:
        start_http_server(args.metrics_port)
    log.info("watching %s", ", ".join(args.namespace) if args.namespace else "all namespaces")
    kopf.run(
        registry=registry,
        standalone=True,  # HA is the Lease above, not kopf peering (no extra CRDs)
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz"
        if args.health_port
        else None,
    )
