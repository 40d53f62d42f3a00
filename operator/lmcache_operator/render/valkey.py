"""The optional in-cluster Valkey: the remote tier shared by this deployment's pods."""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from lmcache_operator import api, quantity
from lmcache_operator.render.common import (
    VALKEY,
    VLLM,
    Manifest,
    Owner,
    container_security,
    labels,
    metadata,
    pod_security,
    port_service,
    selector,
    stable_hash,
)
from lmcache_operator.render.engine_config import VALKEY_PORT
from lmcache_operator.spec import Spec

VALKEY_UID = 999  # the `valkey` user of the official image
AUTH_FILE = "/run/valkey/auth.conf"
MIB = 1 << 20


def secret_name(owner: Owner) -> str:
    return owner.child("valkey-auth")


def auth_secret_ref(spec: Spec, owner: Owner) -> tuple[str, str] | None:
    """(secret, key) of the in-cluster Valkey's password, or None without one."""
    auth = spec.valkey.auth
    if not (spec.valkey.enabled and auth.enabled):
        return None
    return (auth.existing_secret or secret_name(owner), auth.password_key)


@dataclass(frozen=True)
class Credentials:
    """The Secret vLLM pods read the remote tier's credentials from (as env, at start)."""

    secret: str
    password_key: str
    username_key: str | None
    """None for the in-cluster Valkey: a password only."""
    field: str
    """The spec field that names the Secret, for messages."""


def credentials(spec: Spec, owner: Owner) -> Credentials | None:
    """The in-cluster Valkey's password (generated or ``valkey.auth.existingSecret``), else
    an external server's ``remote.credentialsSecretRef``, else None."""
    if ref := auth_secret_ref(spec, owner):
        return Credentials(ref[0], ref[1], None, "valkey.auth.existingSecret")
    remote = spec.remote
    if remote.url and remote.credentials_secret:
        return Credentials(
            remote.credentials_secret,
            remote.password_key,
            remote.username_key,
            "remote.credentialsSecretRef.name",
        )
    return None


def secret_refs(workload: Manifest) -> set[str]:
    """Secrets a workload's containers read through env."""
    pod = workload.get("spec", {}).get("template", {}).get("spec", {})
    return {
        ref["name"]
        for c in pod.get("containers") or []
        for var in c.get("env") or []
        if (ref := (var.get("valueFrom") or {}).get("secretKeyRef"))
    }


def generated_secret_needed(spec: Spec) -> bool:
    return spec.valkey.enabled and spec.valkey.auth.enabled and not spec.valkey.auth.existing_secret


def new_password() -> str:
    """URL- and config-safe, so it needs no quoting in valkey.conf."""
    return secrets.token_hex(24)


def password_secret(spec: Spec, owner: Owner, password: str) -> Manifest:
    """The generated password: created once and never written again (or read: the operator
    only ever sees its metadata), so it cannot drift from what the running Valkey uses."""
    data = {spec.valkey.auth.password_key: base64.b64encode(password.encode()).decode()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(owner, secret_name(owner), VALKEY),
        "type": "Opaque",
        "data": data,
    }


def memory_limit(spec: Spec) -> str:
    """Default container memory: maxmemory plus headroom for allocator overhead (25% +
    256Mi); with persistence twice maxmemory, because an RDB fork can copy every page."""
    if spec.valkey.memory is not None:
        return spec.valkey.memory
    cap = quantity.parse(spec.valkey.max_memory)
    factor = Fraction(2) if spec.valkey.persistence.enabled else Fraction(5, 4)
    mib = -(-(cap * factor + 256 * MIB) // MIB)
    return quantity.format_binary(int(mib) * MIB)


def valkey_conf(spec: Spec) -> str:
    """allkeys-lru under maxmemory: a full cache evicts old chunks instead of failing."""
    lines = [
        "bind * -::*",
        f"port {VALKEY_PORT}",
        "protected-mode no",
        f"maxmemory {int(quantity.parse(spec.valkey.max_memory))}",
        "maxmemory-policy allkeys-lru",
        "dir /data",
        "appendonly no",
        'save "3600 1 300 100"' if spec.valkey.persistence.enabled else 'save ""',
    ]
    if spec.valkey.auth.enabled:
        lines.append(f"include {AUTH_FILE}")
    return "\n".join(lines) + "\n"


def configmap(spec: Spec, owner: Owner) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, owner.child("valkey-config"), VALKEY),
        "data": {"valkey.conf": valkey_conf(spec)},
    }


def _command(spec: Spec) -> list[str]:
    """With auth, the password goes from env into a tmpfs file, not onto the command line,
    double-quoted with backslashes and quotes escaped so any password parses as one value."""
    if not spec.valkey.auth.enabled:
        return ["valkey-server", "/etc/valkey/valkey.conf"]
    script = (
        """escaped=$(printf '%s' "$VALKEY_PASSWORD" | sed 's/[\\\\"]/\\\\&/g') && """
        f"""printf 'requirepass "%s"\\n' "$escaped" > {AUTH_FILE} """
        "&& exec valkey-server /etc/valkey/valkey.conf"
    )
    return ["sh", "-c", script]


def _container(spec: Spec, owner: Owner) -> dict[str, Any]:
    memory = memory_limit(spec)
    env: list[dict[str, Any]] = []
    ref = auth_secret_ref(spec, owner)
    if ref:
        env = [
            {"name": var, "valueFrom": {"secretKeyRef": {"name": ref[0], "key": ref[1]}}}
            # valkey-cli (the readiness probe) reads VALKEYCLI_AUTH, older builds REDISCLI_AUTH.
            for var in ("VALKEY_PASSWORD", "VALKEYCLI_AUTH", "REDISCLI_AUTH")
        ]
    return {
        "name": "valkey",
        "image": spec.valkey.image,
        "command": _command(spec),
        "env": env,
        "ports": [{"name": "valkey", "containerPort": VALKEY_PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": spec.valkey.cpu, "memory": memory},
            "limits": {"memory": memory},
        },
        "readinessProbe": {
            "exec": {"command": ["sh", "-c", "valkey-cli -h 127.0.0.1 ping | grep -q PONG"]},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
        },
        "livenessProbe": {
            "tcpSocket": {"port": "valkey"},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/valkey", "readOnly": True},
            {"name": "run", "mountPath": "/run/valkey"},
            {"name": "data", "mountPath": "/data"},
        ],
        "securityContext": container_security(read_only_root=True),
    }


def statefulset(spec: Spec, owner: Owner, secret_hash: str | None = None) -> Manifest:
    """`secret_hash` follows the password's Secret: a new password restarts the server."""
    conf = configmap(spec, owner)
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": conf["metadata"]["name"]}},
        {"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]
    annotations = {api.ANNOTATION_CONFIG_HASH: stable_hash(conf["data"])}
    if secret_hash:
        annotations[api.ANNOTATION_SECRET_HASH] = secret_hash
    persist = spec.valkey.persistence
    claims: list[dict[str, Any]] = []
    if persist.enabled:
        claim_spec: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": persist.size}},
        }
        if persist.storage_class:
            claim_spec["storageClassName"] = persist.storage_class
        claims.append({"metadata": {"name": "data"}, "spec": claim_spec})
    else:
        volumes.append({"name": "data", "emptyDir": {}})
    sts_spec: dict[str, Any] = {
        "replicas": 1,
        "serviceName": owner.child("valkey-headless"),
        "selector": {"matchLabels": selector(owner, VALKEY)},
        "template": {
            "metadata": {
                "labels": labels(owner, VALKEY),
                # valkey.conf is read at start: a changed file must restart the server.
                "annotations": annotations,
            },
            "spec": {
                "securityContext": pod_security(VALKEY_UID),
                "automountServiceAccountToken": False,
                "containers": [_container(spec, owner)],
                "volumes": volumes,
            },
        },
    }
    if claims:
        sts_spec["volumeClaimTemplates"] = claims
        # The data is a cache: deleting the deployment should not strand its volume.
        sts_spec["persistentVolumeClaimRetentionPolicy"] = {
            "whenDeleted": "Delete",
            "whenScaled": "Retain",
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(owner, owner.child("valkey"), VALKEY),
        "spec": sts_spec,
    }


def services(owner: Owner) -> list[Manifest]:
    """A headless Service for the StatefulSet's identity, a ClusterIP one for clients."""
    return [
        port_service(owner, owner.child("valkey-headless"), VALKEY, "valkey", VALKEY_PORT, True),
        port_service(owner, owner.child("valkey"), VALKEY, "valkey", VALKEY_PORT, False),
    ]


def network_policy(owner: Owner, client_selector: dict[str, str]) -> Manifest:
    """Only this deployment's vLLM pods may talk to its Valkey."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(owner, owner.child("valkey"), VALKEY),
        "spec": {
            "podSelector": {"matchLabels": selector(owner, VALKEY)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": client_selector}}],
                    "ports": [{"protocol": "TCP", "port": VALKEY_PORT}],
                }
            ],
        },
    }


def manifests(spec: Spec, owner: Owner, secret_hash: str | None) -> list[Manifest]:
    """Everything Valkey needs but the generated password's Secret, which the reconciler
    creates once, in apply order (config before the server)."""
    return [
        configmap(spec, owner),
        *services(owner),
        statefulset(spec, owner, secret_hash),
        network_policy(owner, selector(owner, VLLM)),
    ]
