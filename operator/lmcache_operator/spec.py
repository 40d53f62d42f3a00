"""The typed `LMCacheDeployment` spec: defaults, parsing, and the checks CEL cannot express.

The CRD schema is the source of truth for shapes and defaults (the API server applies them);
the same defaults are repeated here so that a spec read before defaulting, or in a unit test,
means the same thing. `tests/operator/test_crd.py` fails when the two disagree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import urlsplit

from lmcache_operator import api, quantity

T = TypeVar("T")

DEFAULT_MEMORY_BASE = 8 * quantity.GIB
DEFAULT_MEMORY_PER_RANK = 8 * quantity.GIB
DEFAULT_SHM_PER_RANK = quantity.GIB


class SpecError(ValueError):
    """A spec field with the wrong type: names the field and what is allowed."""


def _get(raw: Mapping[str, Any], path: str, key: str, kind: type[T], default: T) -> T:
    value = raw.get(key)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # type: ignore[return-value]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SpecError(f"spec.{path}{key}: expected {kind.__name__}, got {value!r}")
    return value


def _opt(raw: Mapping[str, Any], path: str, key: str, kind: type[T]) -> T | None:
    return _get(raw, path, key, kind, None)


def _obj(raw: Mapping[str, Any], path: str, key: str) -> Mapping[str, Any]:
    return _get(raw, path, key, dict, {})


def _quantity(raw: Mapping[str, Any], path: str, key: str, default: str | None) -> str | None:
    value = raw.get(key, default)
    if value is None:
        return None
    try:
        return quantity.canonical(value)
    except quantity.QuantityError as e:
        raise SpecError(f"spec.{path}{key}: {e}") from None


@dataclass(frozen=True)
class Image:
    repository: str = api.DEFAULT_IMAGE_REPOSITORY
    tag: str = api.DEFAULT_IMAGE_TAG
    digest: str | None = None
    pull_policy: str = "IfNotPresent"
    pull_secrets: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        """A digest pins the image exactly, so it wins over the tag."""
        if self.digest:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag}"


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(frozen=True)
class Vllm:
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    extra_args: tuple[str, ...] = ()
    env: tuple[Mapping[str, Any], ...] = ()
    startup_timeout_seconds: int = 1800


@dataclass(frozen=True)
class Resources:
    gpus: int | None = None
    gpu_resource_name: str = "nvidia.com/gpu"
    cpu: str = "4"
    memory: str | None = None  # None: DEFAULT_MEMORY_BASE + DEFAULT_MEMORY_PER_RANK x TP
    shm_size: str | None = None  # None: DEFAULT_SHM_PER_RANK x TP
    ephemeral_storage: str = "10Gi"


@dataclass(frozen=True)
class ModelCache:
    """Where Hugging Face downloads land (HF_HOME): an emptyDir of `size` unless a per-pod
    ephemeral PVC (`storage_class`) or an existing, possibly shared, claim is named."""

    size: str = "50Gi"
    storage_class: str | None = None
    claim_name: str | None = None
    path: str = "/var/cache/huggingface"
    read_only: bool = False


@dataclass(frozen=True)
class Strategy:
    type: str = "RollingUpdate"
    max_surge: int | str = 0
    max_unavailable: int | str = 1


@dataclass(frozen=True)
class KvEvents:
    """vLLM's KV-cache events (ZMQ PUB) for KV-aware routers; one publisher per pod."""

    enabled: bool = False
    port: int = 5557
    topic: str = ""


@dataclass(frozen=True)
class LocalDisk:
    enabled: bool = False
    size: float | None = None
    path: str = "/var/cache/lmcache"
    storage_class: str | None = None


@dataclass(frozen=True)
class Lmcache:
    chunk_size: int = 256
    local_cpu: bool = True
    max_local_cpu_size: float = 5.0
    hugepages: bool = False
    local_disk: LocalDisk = field(default_factory=LocalDisk)
    prefetch: bool = False
    extra_config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ValkeyAuth:
    enabled: bool = True
    existing_secret: str | None = None
    password_key: str = "password"


@dataclass(frozen=True)
class Persistence:
    enabled: bool = False
    size: str = "10Gi"
    storage_class: str | None = None


@dataclass(frozen=True)
class Valkey:
    enabled: bool = False
    image: str = api.DEFAULT_VALKEY_IMAGE
    max_memory: str = "4Gi"
    cpu: str = "1"
    memory: str | None = None
    persistence: Persistence = field(default_factory=Persistence)
    auth: ValkeyAuth = field(default_factory=ValkeyAuth)


@dataclass(frozen=True)
class Remote:
    url: str | None = None
    credentials_secret: str | None = None
    username_key: str = "username"
    password_key: str = "password"


@dataclass(frozen=True)
class Placement:
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] = field(default_factory=dict)
    priority_class_name: str | None = None
    runtime_class_name: str | None = None


@dataclass(frozen=True)
class Spec:
    model: str
    served_model_name: str | None = None
    replicas: int = 1
    image: Image = field(default_factory=Image)
    hf_token: SecretKeyRef | None = None
    vllm: Vllm = field(default_factory=Vllm)
    resources: Resources = field(default_factory=Resources)
    lmcache: Lmcache = field(default_factory=Lmcache)
    valkey: Valkey = field(default_factory=Valkey)
    remote: Remote = field(default_factory=Remote)
    placement: Placement = field(default_factory=Placement)
    model_cache: ModelCache = field(default_factory=ModelCache)
    volumes: tuple[Mapping[str, Any], ...] = ()
    volume_mounts: tuple[Mapping[str, Any], ...] = ()
    strategy: Strategy = field(default_factory=Strategy)
    pod_annotations: Mapping[str, str] = field(default_factory=dict)
    pod_labels: Mapping[str, str] = field(default_factory=dict)
    service_account_name: str | None = None
    service_type: str = "ClusterIP"
    service_port: int = 8000
    metrics_enabled: bool = True
    metrics_port: int = 9090
    kv_events: KvEvents = field(default_factory=KvEvents)

    @property
    def gpus_per_pod(self) -> int:
        """One GPU per tensor-parallel rank unless the spec asks for more."""
        return self.resources.gpus or self.vllm.tensor_parallel_size

    @property
    def engine_processes(self) -> int:
        """vLLM starts one LMCache engine per TP rank, and LMCache sizes are per engine."""
        return self.vllm.tensor_parallel_size

    @property
    def vllm_memory(self) -> str:
        """Memory for vLLM itself: the API server process plus one worker per TP rank."""
        if self.resources.memory is not None:
            return self.resources.memory
        ranks = self.vllm.tensor_parallel_size
        return quantity.format_binary(DEFAULT_MEMORY_BASE + DEFAULT_MEMORY_PER_RANK * ranks)

    @property
    def shm_size(self) -> str:
        """/dev/shm (NCCL and vLLM's IPC between ranks): bounded, since it is pod memory."""
        if self.resources.shm_size is not None:
            return self.resources.shm_size
        return quantity.format_binary(DEFAULT_SHM_PER_RANK * self.vllm.tensor_parallel_size)


def _seq(raw: Mapping[str, Any], path: str, key: str) -> tuple[Any, ...]:
    return tuple(_get(raw, path, key, list, []))


def _int_or_str(raw: Mapping[str, Any], path: str, key: str, default: int) -> int | str:
    """A count or a percentage ("25%"), as a Deployment's rollingUpdate takes them."""
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SpecError(f"spec.{path}{key}: expected an integer or a percentage, got {value!r}")
    return value


def parse(raw: Mapping[str, Any]) -> Spec:
    """Read `spec` as stored by the API server (or a test) into a `Spec`, with defaults."""
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise SpecError("spec.model: required, the model name or path to serve")
    image = _obj(raw, "", "image")
    hf = _obj(raw, "", "hfTokenSecretRef")
    vllm = _obj(raw, "", "vllm")
    res = _obj(raw, "", "resources")
    lmc = _obj(raw, "", "lmcache")
    disk = _obj(lmc, "lmcache.", "localDisk")
    vk = _obj(raw, "", "valkey")
    vk_res = _obj(vk, "valkey.", "resources")
    vk_persist = _obj(vk, "valkey.", "persistence")
    vk_auth = _obj(vk, "valkey.", "auth")
    remote = _obj(raw, "", "remote")
    creds = _obj(remote, "remote.", "credentialsSecretRef")
    service = _obj(raw, "", "service")
    metrics = _obj(raw, "", "metrics")
    cache = _obj(raw, "", "modelCache")
    strategy = _obj(raw, "", "strategy")
    rolling = _obj(strategy, "strategy.", "rollingUpdate")
    events = _obj(raw, "", "kvEvents")
    return Spec(
        model=model,
        served_model_name=_opt(raw, "", "servedModelName", str),
        replicas=_get(raw, "", "replicas", int, 1),
        image=Image(
            repository=_get(image, "image.", "repository", str, api.DEFAULT_IMAGE_REPOSITORY),
            tag=str(image.get("tag", api.DEFAULT_IMAGE_TAG)),
            digest=_opt(image, "image.", "digest", str),
            pull_policy=_get(image, "image.", "pullPolicy", str, "IfNotPresent"),
            pull_secrets=tuple(str(s) for s in _seq(image, "image.", "pullSecrets")),
        ),
        hf_token=(
            SecretKeyRef(
                name=_get(hf, "hfTokenSecretRef.", "name", str, ""),
                key=_get(hf, "hfTokenSecretRef.", "key", str, "token"),
            )
            if hf
            else None
        ),
        vllm=Vllm(
            max_model_len=_opt(vllm, "vllm.", "maxModelLen", int),
            tensor_parallel_size=_get(vllm, "vllm.", "tensorParallelSize", int, 1),
            gpu_memory_utilization=_get(vllm, "vllm.", "gpuMemoryUtilization", float, 0.9),
            extra_args=tuple(str(a) for a in _seq(vllm, "vllm.", "extraArgs")),
            env=_seq(vllm, "vllm.", "env"),
            startup_timeout_seconds=_get(vllm, "vllm.", "startupTimeoutSeconds", int, 1800),
        ),
        resources=Resources(
            gpus=_opt(res, "resources.", "gpus", int),
            gpu_resource_name=_get(res, "resources.", "gpuResourceName", str, "nvidia.com/gpu"),
            cpu=_quantity(res, "resources.", "cpu", "4") or "4",
            memory=_quantity(res, "resources.", "memory", None),
            shm_size=_quantity(res, "resources.", "shmSize", None),
            ephemeral_storage=_quantity(res, "resources.", "ephemeralStorage", "10Gi") or "10Gi",
        ),
        lmcache=Lmcache(
            chunk_size=_get(lmc, "lmcache.", "chunkSize", int, 256),
            local_cpu=_get(lmc, "lmcache.", "localCpu", bool, True),
            max_local_cpu_size=_get(lmc, "lmcache.", "maxLocalCpuSize", float, 5.0),
            hugepages=_get(
                _obj(lmc, "lmcache.", "hugepages"), "lmcache.hugepages.", "enabled", bool, False
            ),
            local_disk=LocalDisk(
                enabled=_get(disk, "lmcache.localDisk.", "enabled", bool, False),
                size=_opt(disk, "lmcache.localDisk.", "size", float),
                path=_get(disk, "lmcache.localDisk.", "path", str, "/var/cache/lmcache"),
                storage_class=_opt(disk, "lmcache.localDisk.", "storageClassName", str),
            ),
            prefetch=_get(lmc, "lmcache.", "prefetch", bool, False),
            extra_config=_obj(lmc, "lmcache.", "extraConfig"),
        ),
        valkey=Valkey(
            enabled=_get(vk, "valkey.", "enabled", bool, False),
            image=_get(vk, "valkey.", "image", str, api.DEFAULT_VALKEY_IMAGE),
            max_memory=_quantity(vk, "valkey.", "maxMemory", "4Gi") or "4Gi",
            cpu=_quantity(vk_res, "valkey.resources.", "cpu", "1") or "1",
            memory=_quantity(vk_res, "valkey.resources.", "memory", None),
            persistence=Persistence(
                enabled=_get(vk_persist, "valkey.persistence.", "enabled", bool, False),
                size=_quantity(vk_persist, "valkey.persistence.", "size", "10Gi") or "10Gi",
                storage_class=_opt(vk_persist, "valkey.persistence.", "storageClassName", str),
            ),
            auth=ValkeyAuth(
                enabled=_get(vk_auth, "valkey.auth.", "enabled", bool, True),
                existing_secret=_opt(vk_auth, "valkey.auth.", "existingSecret", str),
                password_key=_get(vk_auth, "valkey.auth.", "passwordKey", str, "password"),
            ),
        ),
        remote=Remote(
            url=_opt(remote, "remote.", "url", str),
            credentials_secret=_opt(creds, "remote.credentialsSecretRef.", "name", str),
            username_key=_get(
                creds, "remote.credentialsSecretRef.", "usernameKey", str, "username"
            ),
            password_key=_get(
                creds, "remote.credentialsSecretRef.", "passwordKey", str, "password"
            ),
        ),
        placement=Placement(
            node_selector=_obj(raw, "", "nodeSelector"),
            tolerations=_seq(raw, "", "tolerations"),
            affinity=_obj(raw, "", "affinity"),
            priority_class_name=_opt(raw, "", "priorityClassName", str),
            runtime_class_name=_opt(raw, "", "runtimeClassName", str),
        ),
        model_cache=ModelCache(
            size=_quantity(cache, "modelCache.", "size", "50Gi") or "50Gi",
            storage_class=_opt(cache, "modelCache.", "storageClassName", str),
            claim_name=_opt(cache, "modelCache.", "claimName", str),
            path=_get(cache, "modelCache.", "path", str, "/var/cache/huggingface"),
            read_only=_get(cache, "modelCache.", "readOnly", bool, False),
        ),
        volumes=_seq(raw, "", "volumes"),
        volume_mounts=_seq(raw, "", "volumeMounts"),
        strategy=Strategy(
            type=_get(strategy, "strategy.", "type", str, "RollingUpdate"),
            max_surge=_int_or_str(rolling, "strategy.rollingUpdate.", "maxSurge", 0),
            max_unavailable=_int_or_str(rolling, "strategy.rollingUpdate.", "maxUnavailable", 1),
        ),
        pod_annotations=_obj(raw, "", "podAnnotations"),
        pod_labels=_obj(raw, "", "podLabels"),
        service_account_name=_opt(raw, "", "serviceAccountName", str),
        service_type=_get(service, "service.", "type", str, "ClusterIP"),
        service_port=_get(service, "service.", "port", int, 8000),
        metrics_enabled=_get(metrics, "metrics.", "enabled", bool, True),
        metrics_port=_get(metrics, "metrics.", "port", int, 9090),
        kv_events=KvEvents(
            enabled=_get(events, "kvEvents.", "enabled", bool, False),
            port=_get(events, "kvEvents.", "port", int, 5557),
            topic=_get(events, "kvEvents.", "topic", str, ""),
        ),
    )


# LMCache keys the operator derives from typed fields: setting them in extraConfig would
# bypass the memory accounting and the validation above, so they are refused there.
MANAGED_ENGINE_KEYS = {
    "chunk_size": "lmcache.chunkSize",
    "local_cpu": "lmcache.localCpu",
    "max_local_cpu_size": "lmcache.maxLocalCpuSize",
    "local_cpu_use_hugepages": "lmcache.hugepages.enabled",
    "local_disk": "lmcache.localDisk",
    "max_local_disk_size": "lmcache.localDisk.size",
    "remote_url": "valkey or remote.url",
    "remote_username": "remote.credentialsSecretRef",
    "remote_password": "remote.credentialsSecretRef",
    "prefetch": "lmcache.prefetch",
    "metrics_port": "metrics.port",
}

# vLLM flags the operator renders itself, with the spec field that sets each one.
MANAGED_VLLM_FLAGS = {
    "--kv-transfer-config": "(set by the operator)",
    "--tensor-parallel-size": "vllm.tensorParallelSize",
    "-tp": "vllm.tensorParallelSize",
    "--max-model-len": "vllm.maxModelLen",
    "--gpu-memory-utilization": "vllm.gpuMemoryUtilization",
    "--served-model-name": "servedModelName",
    "--port": "service.port",
    "--host": "(set by the operator)",
    "--kv-events-config": "kvEvents",
}

# vLLM flags that would change what the pod is sized for, or override any managed flag.
REFUSED_VLLM_FLAGS = {
    "--pipeline-parallel-size": "GPUs and hugepages are sized for tensorParallelSize ranks only",
    "-pp": "GPUs and hugepages are sized for tensorParallelSize ranks only",
    "--data-parallel-size": "GPUs and hugepages are sized for tensorParallelSize ranks only",
    "-dp": "GPUs and hugepages are sized for tensorParallelSize ranks only",
    "--config": "a config file could override the flags the operator renders",
}

REMOTE_SCHEMES = ("valkey", "valkeys", "redis", "rediss")

# The engine's keys with their types and bounds (`lmcache config-reference --format
# json-schema` of the engine this operator deploys by default), written by `make
# crd-engine-schema` together with the CRD's extraConfig schema. The API server refuses what
# breaks them; this copy catches objects stored before the CRD knew (the server never
# re-validates stored objects).
ENGINE_KEYS: Mapping[str, Mapping[str, Any]] = json.loads(
    resources.files("lmcache_operator").joinpath("engine_keys.json").read_text()
)
_JSON_TYPES: Mapping[str, tuple[type, ...]] = {
    "boolean": (bool,),
    "integer": (int,),
    "number": (int, float),
    "string": (str,),
}


def _flag_name(arg: str) -> str:
    """The flag as vLLM's parser resolves it: ``--a_b=x`` and ``--a-b.key=x`` both set ``--a-b``."""
    name = arg.split("=", 1)[0]
    if name.startswith("--"):
        name = "--" + name[2:].split(".", 1)[0].replace("_", "-")
    return name


def _resolve(flag: str, known: Mapping[str, str]) -> str | None:
    """The known flag ``flag`` names, exactly or as argparse's unambiguous abbreviation."""
    if flag in known:
        return flag
    if flag.startswith("--") and len(flag) > 3:
        matches = [name for name in known if name.startswith(flag)]
        if len(matches) == 1:
            return matches[0]
    return None


def problems(spec: Spec) -> list[str]:
    """Semantic errors the CRD's schema and CEL rules cannot catch, each naming its field."""
    found: list[str] = []
    for key, value in sorted(spec.lmcache.extra_config.items()):
        where = f"spec.lmcache.extraConfig.{key}"
        if key in MANAGED_ENGINE_KEYS:
            found.append(
                f"{where}: managed by the operator; set {MANAGED_ENGINE_KEYS[key]} instead"
            )
        elif key not in ENGINE_KEYS:
            found.append(
                f"{where}: not a key of the LMCache engine (keys: {', '.join(sorted(ENGINE_KEYS))})"
            )
        elif allowed := _engine_value_problem(ENGINE_KEYS[key], value):
            found.append(f"{where}: {value!r} is not allowed; the engine takes {allowed}")
    for arg in spec.vllm.extra_args:
        flag = _flag_name(arg)
        if managed := _resolve(flag, MANAGED_VLLM_FLAGS):
            shown = arg.split("=", 1)[0]
            alias = "" if shown == managed else f" (vLLM reads it as {managed})"
            found.append(
                f"spec.vllm.extraArgs: {shown}{alias} is rendered by the operator; "
                f"use {MANAGED_VLLM_FLAGS[managed]}"
            )
        elif refused := _resolve(flag, REFUSED_VLLM_FLAGS):
            found.append(
                f"spec.vllm.extraArgs: {refused} is not supported: {REFUSED_VLLM_FLAGS[refused]}"
            )
    for i, var in enumerate(spec.vllm.env):
        name = str(var.get("name", ""))
        if name.startswith("LMCACHE_") or (name == "HF_TOKEN" and spec.hf_token):
            found.append(
                f"spec.vllm.env[{i}].name: {name} is set by the operator; "
                "configure the engine through spec.lmcache and secrets through their refs"
            )
    if spec.gpus_per_pod < spec.vllm.tensor_parallel_size:
        found.append(
            f"spec.resources.gpus: {spec.gpus_per_pod} GPUs cannot host "
            f"vllm.tensorParallelSize={spec.vllm.tensor_parallel_size} ranks"
        )
    if spec.lmcache.local_disk.enabled and not spec.lmcache.local_disk.path.startswith("/"):
        found.append(
            f"spec.lmcache.localDisk.path: {spec.lmcache.local_disk.path!r} must be absolute"
        )
    found.extend(_volume_problems(spec))
    if spec.remote.url:
        found.extend(_remote_url_problems(spec.remote.url))
    if spec.valkey.enabled and spec.valkey.memory is not None:
        limit, cap = quantity.parse(spec.valkey.memory), quantity.parse(spec.valkey.max_memory)
        if limit <= cap:
            found.append(
                f"spec.valkey.resources.memory: {spec.valkey.memory} must exceed "
                f"valkey.maxMemory {spec.valkey.max_memory} (the server needs headroom "
                "above its data, or the kernel kills it instead of Valkey evicting)"
            )
    return found


def _engine_allowed(schema: Mapping[str, Any]) -> str:
    """What the engine takes for a key, in words."""
    kind = schema["type"]
    if schema.get("enum"):
        allowed = "one of " + ", ".join(map(str, schema["enum"]))
    else:
        low, high = schema.get("minimum"), schema.get("maximum")
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if schema.get('exclusiveMinimum') else '>='} {_number(low)}")
        if high is not None:
            bounds.append(f"<= {_number(high)}")
        allowed = f"{'an' if kind == 'integer' else 'a'} {kind}"
        allowed += f" {' and '.join(bounds)}" if bounds else ""
    return allowed + (", or null" if schema.get("nullable") else "")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _engine_value_problem(schema: Mapping[str, Any], value: Any) -> str | None:
    """What the engine allows for a key, when `value` breaks its type or bounds."""
    kind = schema["type"]
    low, high = schema.get("minimum"), schema.get("maximum")
    if value is None:
        return None if schema.get("nullable") else _engine_allowed(schema)
    if isinstance(value, bool) != (kind == "boolean") or not isinstance(value, _JSON_TYPES[kind]):
        return _engine_allowed(schema)
    if (
        (schema.get("enum") and value not in schema["enum"])
        or (low is not None and (value <= low if schema.get("exclusiveMinimum") else value < low))
        or (high is not None and value > high)
    ):
        return _engine_allowed(schema)
    return None


def _volume_problems(spec: Spec) -> list[str]:
    """Passthrough volumes must not shadow the operator's, and every mount needs a volume."""
    found = []
    managed_paths = {api.CONFIG_DIR, "/dev/shm", spec.model_cache.path}
    if spec.metrics_enabled:
        managed_paths.add(api.METRICS_DIR)
    if spec.lmcache.hugepages:
        managed_paths.add(api.HUGEPAGES_DIR)
    if spec.lmcache.local_disk.enabled:
        managed_paths.add(spec.lmcache.local_disk.path)
    names: set[str] = set()
    for i, volume in enumerate(spec.volumes):
        name = str(volume.get("name", ""))
        if name in api.VLLM_VOLUMES:
            found.append(
                f"spec.volumes[{i}].name: {name} is the operator's; "
                f"pick another name (reserved: {', '.join(api.VLLM_VOLUMES)})"
            )
        elif name in names:
            found.append(f"spec.volumes[{i}].name: {name} is listed twice")
        names.add(name)
    paths: set[str] = set()
    for i, mount in enumerate(spec.volume_mounts):
        name, where = str(mount.get("name", "")), str(mount.get("mountPath", ""))
        if name not in names:
            found.append(f"spec.volumeMounts[{i}].name: no volume {name!r} in spec.volumes")
        if where.rstrip("/") in managed_paths or where in paths:
            found.append(
                f"spec.volumeMounts[{i}].mountPath: {where} is already mounted "
                f"(the operator mounts {', '.join(sorted(managed_paths))})"
            )
        paths.add(where)
    return found


def _remote_url_problems(raw: str) -> list[str]:
    """What the engine would refuse in ``remote.url``, and credentials that would leak into the
    ConfigMap (they belong in the Secret)."""
    try:
        url = urlsplit(raw)
        _ = url.port  # parses the port: raises on a malformed one
    except ValueError as e:
        return [f"spec.remote.url: {raw!r} is not a valid URL ({e})"]
    found = []
    if url.scheme not in REMOTE_SCHEMES:
        found.append(
            f"spec.remote.url: scheme {url.scheme!r} not supported; "
            f"use one of {', '.join(s + '://' for s in REMOTE_SCHEMES)}"
        )
    if url.username or url.password or "password" in url.query.lower():
        found.append(
            "spec.remote.url: must not carry credentials; "
            "put them in the Secret named by remote.credentialsSecretRef"
        )
    if not url.hostname:
        found.append(f"spec.remote.url: {raw!r} has no host")
    return found
