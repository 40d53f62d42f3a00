"""Names shared by the CRD, the renderers and the handlers: one place, so they cannot drift."""

GROUP = "serving.lmcache-kube.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LMCacheDeployment"
PLURAL = "lmcachedeployments"

FIELD_MANAGER = "lmcache-operator"

DEFAULT_IMAGE_REPOSITORY = "ghcr.io/lmcache-kube/vllm-lmcache"
DEFAULT_IMAGE_TAG = "0.1.0"
DEFAULT_VALKEY_IMAGE = "docker.io/valkey/valkey:8.1.4"

# Labels and annotations the operator puts on what it owns.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "lmcache-operator"
PART_OF = "lmcache-kube"
ANNOTATION_CONFIG_HASH = f"{GROUP}/config-hash"
# The identity and version of the Secret a pod reads its Valkey password from at start.
ANNOTATION_SECRET_HASH = f"{GROUP}/secret-hash"

# Where the projected LMCache config lands inside the vLLM container.
CONFIG_DIR = "/etc/lmcache"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
HUGEPAGES_DIR = "/dev/hugepages"
# prometheus-client's multiprocess directory: every TP rank's engine writes its metrics there,
# so rank 0's metrics_port serves them all in one scrape.
METRICS_DIR = "/var/run/prometheus-multiproc"
# Volume names the operator gives the vLLM pod; spec.volumes may not reuse them.
VLLM_VOLUMES = (
    "lmcache-config",
    "dshm",
    "hugepages",
    "lmcache-disk",
    "model-cache",
    "prometheus-multiproc",
)
