"""Prometheus metrics of the operator itself (not of the engine)."""

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter(
    "lmcache_operator_reconciles_total", "Reconciles finished, by result", ["result"]
)
RECONCILE_SECONDS = Histogram(
    "lmcache_operator_reconcile_duration_seconds",
    "Wall time of one reconcile",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
INVALID = Counter("lmcache_operator_invalid_specs_total", "Reconciles that found the spec invalid")
APPLIES = Counter(
    "lmcache_operator_applies_total",
    "Server-side applies sent (only when a child differed)",
    ["kind"],
)
STATUS_PATCHES = Counter(
    "lmcache_operator_status_patches_total", "Status patches sent (only when status changed)"
)
QUEUE_DEPTH = Gauge("lmcache_operator_queue_depth", "Deployments waiting to be reconciled")
LEADER = Gauge("lmcache_operator_leader", "1 while this replica holds the leader lease")
API_REQUESTS = Counter(
    "lmcache_operator_api_requests_total",
    "Requests to the API server by the reconciler and leader election, by HTTP status "
    '("none": no answer within --request-timeout)',
    ["code"],
)
