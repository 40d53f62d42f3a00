"""Prometheus metrics of one engine (one TP rank), under upstream LMCache's names.

Where upstream LMCache has a metric (``lmcache:num_hit_tokens``, ``lmcache:local_cache_usage``,
``lmcache:retrieve_speed``, ...) this engine exports the same name, type, unit and labels
(``model_name``, ``worker_id`` = the TP rank), so upstream Grafana dashboards work unchanged;
what upstream has no metric for keeps our own ``lmcache_`` names. Callers record events
(``lookup``, ``retrieve``, ``store``, ``disk_io``, ``remote_io``...); which series they touch
is decided here.

Each engine has a registry of its own (several engines in one process do not collide). With
``PROMETHEUS_MULTIPROC_DIR`` set in every process (as upstream documents, and as the operator
renders), every rank's values also reach one scrape: rank 0's ``metrics_port`` and vLLM's own
``/metrics``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

MetricT = TypeVar("MetricT", Counter, Gauge, Histogram)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_SECONDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_MILLISECONDS = (1, 5, 10, 20, 40, 60, 80, 100, 250, 500, 750, 1000, 2500, 5000, 10000)
_TOKENS_PER_S = tuple(float(1 << i) for i in range(0, 24, 2))


class EngineMetrics:
    """Counters, gauges and histograms that say whether the cache is earning its memory."""

    def __init__(self, model_name: str, worker_id: int = 0) -> None:
        self.registry = CollectorRegistry()
        self._server: WSGIServer | None = None
        self._values = {"model_name": model_name, "worker_id": str(worker_id)}
        names = list(self._values)  # _of passes the values in this order
        r = self.registry

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, [*names, *extra], registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=r, multiprocess_mode="livesum")

        def histogram(
            name: str, doc: str, buckets: Iterable[float], extra: tuple[str, ...] = ()
        ) -> Histogram:
            return Histogram(name, doc, [*names, *extra], buckets=tuple(buckets), registry=r)

        # Upstream LMCache's names (prometheus_client adds _total to counters).
        self._lookups = counter("lmcache:num_lookup_requests", "lookup requests")
        self._lookup_tokens = counter("lmcache:num_lookup_tokens", "tokens asked for in lookups")
        self._lookup_hits = counter("lmcache:num_lookup_hits", "tokens found by lookups")
        self._lookup_rate = gauge("lmcache:lookup_hit_rate", "lookup hits / lookup tokens")
        self._retrieves = counter("lmcache:num_retrieve_requests", "retrieve (load) requests")
        self._requested = counter("lmcache:num_requested_tokens", "tokens asked for in retrieves")
        self._hit_tokens = counter("lmcache:num_hit_tokens", "tokens retrieved (loaded)")
        self._retrieve_rate = gauge("lmcache:retrieve_hit_rate", "hit tokens / requested tokens")
        self._stores = counter("lmcache:num_store_requests", "store requests")
        self._stored_tokens = counter("lmcache:num_stored_tokens", "tokens newly stored")
        self._time_to_retrieve = histogram(
            "lmcache:time_to_retrieve", "seconds to retrieve a request's KV", _SECONDS
        )
        self._time_to_store = histogram(
            "lmcache:time_to_store", "seconds to store a step's KV of a request", _SECONDS
        )
        self._retrieve_speed = histogram(
            "lmcache:retrieve_speed", "retrieve speed (tokens per second)", _TOKENS_PER_S
        )
        self._store_speed = histogram(
            "lmcache:store_speed", "store speed (tokens per second)", _TOKENS_PER_S
        )
        self._local_cache = gauge("lmcache:local_cache_usage", "bytes of the CPU pool in use")
        self._local_storage = gauge("lmcache:local_storage_usage", "bytes in the local disk tier")
        self._hot_chunks = gauge("lmcache:local_cpu_hot_cache_count", "chunks in the CPU cache")
        self._pinned = gauge("lmcache:pinned_memory_objs_count", "chunks pinned for requests")
        self._cpu_evictions = counter("lmcache:local_cpu_evict_count", "CPU cache evictions")
        self._cpu_evicted_keys = counter("lmcache:local_cpu_evict_keys_count", "chunks evicted")
        self._remote_reads = counter("lmcache:num_remote_read_requests", "remote GETs")
        self._remote_read_bytes = counter("lmcache:num_remote_read_bytes", "bytes read")
        self._remote_writes = counter("lmcache:num_remote_write_requests", "remote SETs")
        self._remote_write_bytes = counter("lmcache:num_remote_write_bytes", "bytes written")
        self._remote_lookups = counter(
            "lmcache_remote_lookups", "remote existence checks (one round trip per lookup)"
        )
        self._remote_get_ms = histogram(
            "lmcache:remote_time_to_get", "milliseconds per remote read batch", _MILLISECONDS
        )
        self._remote_put_ms = histogram(
            "lmcache:remote_time_to_put", "milliseconds per remote write batch", _MILLISECONDS
        )
        # Ours, where upstream has none.
        self._retrieved_bytes = counter("lmcache_retrieved_bytes", "KV bytes retrieved")
        self._stored_bytes = counter("lmcache_stored_bytes", "KV bytes newly stored")
        self._skipped = counter(
            "lmcache_skipped_stores", "chunks not stored because no memory could be freed"
        )
        self._disk_evictions = counter("lmcache_disk_evictions", "disk tier evictions")
        self._tier_hits = counter("lmcache_tier_hit_chunks", "chunks served per tier", ("tier",))
        self._errors = counter(
            "lmcache_tier_errors", "failed operations per tier (each became a miss)", ("tier", "op")
        )
        self._corrupt = counter("lmcache_corrupt_values", "values refused by validation", ("tier",))
        self._dropped = counter(
            "lmcache_dropped_writes",
            "background writes dropped (queue full or tier down)",
            ("tier",),
        )
        self._disk_ops = counter("lmcache_disk_ops", "disk tier reads and writes", ("op",))
        self._disk_bytes = counter(
            "lmcache_disk_bytes", "bytes read from / written to disk", ("op",)
        )
        self._disk_seconds = histogram(
            "lmcache_disk_latency_seconds", "disk operation latency", _SECONDS, ("op",)
        )
        self._pool_total = gauge("lmcache_pool_total_bytes", "pinned pool capacity in bytes")
        self._breaker = gauge(
            "lmcache_remote_breaker_open", "1 while the remote tier is skipped after failures"
        )
        self._lookup_totals = [0, 0]
        self._retrieve_totals = [0, 0]

    def _of(self, metric: MetricT, *extra: str) -> MetricT:
        """``metric``'s child for this engine (plus any extra label values)."""
        return metric.labels(*self._values.values(), *extra)

    # -- events --------------------------------------------------------------------------

    def lookup(self, requested_tokens: int, hit_tokens: int) -> None:
        self._of(self._lookups).inc()
        self._of(self._lookup_tokens).inc(requested_tokens)
        self._lookup_totals[0] += requested_tokens
        self.lookup_hit(hit_tokens)

    def lookup_hit(self, hit_tokens: int) -> None:
        """More tokens of an earlier lookup found (staged from disk or Valkey)."""
        self._of(self._lookup_hits).inc(hit_tokens)
        self._lookup_totals[1] += hit_tokens
        self._rate(self._lookup_rate, self._lookup_totals)

    def retrieve(
        self, requested_tokens: int, hit_tokens: int, nbytes: int, seconds: float | None = None
    ) -> None:
        self._of(self._retrieves).inc()
        self._of(self._requested).inc(requested_tokens)
        self._of(self._hit_tokens).inc(hit_tokens)
        self._of(self._retrieved_bytes).inc(nbytes)
        self._retrieve_totals[0] += requested_tokens
        self._retrieve_totals[1] += hit_tokens
        self._rate(self._retrieve_rate, self._retrieve_totals)
        self._timed(self._time_to_retrieve, self._retrieve_speed, hit_tokens, seconds)

    def store(self, tokens: int, nbytes: int, seconds: float | None = None) -> None:
        self._of(self._stores).inc()
        self._of(self._stored_tokens).inc(tokens)
        self._of(self._stored_bytes).inc(nbytes)
        self._timed(self._time_to_store, self._store_speed, tokens, seconds)

    def _timed(self, time_of: Histogram, speed_of: Histogram, tokens: int, s: float | None) -> None:
        if s is not None and s > 0 and tokens > 0:
            self._of(time_of).observe(s)
            self._of(speed_of).observe(tokens / s)

    def _rate(self, gauge: Gauge, totals: list[int]) -> None:
        if totals[0]:
            self._of(gauge).set(totals[1] / totals[0])

    def evicted(self, tier: str) -> None:
        if tier == "cpu":
            self._of(self._cpu_evictions).inc()
            self._of(self._cpu_evicted_keys).inc()
        else:
            self._of(self._disk_evictions).inc()

    def skipped_stores(self, chunks: int) -> None:
        self._of(self._skipped).inc(chunks)

    def tier_hits(self, tier: str, chunks: int) -> None:
        self._of(self._tier_hits, tier).inc(chunks)

    def tier_error(self, tier: str, op: str) -> None:
        self._of(self._errors, tier, op).inc()

    def corrupt(self, tier: str) -> None:
        self._of(self._corrupt, tier).inc()

    def dropped_writes(self, tier: str, count: int = 1) -> None:
        self._of(self._dropped, tier).inc(count)

    def disk_io(self, op: str, nbytes: int, seconds: float) -> None:
        """The disk tier moved ``nbytes`` in one ``op`` (read or write)."""
        self._of(self._disk_ops, op).inc()
        self._of(self._disk_bytes, op).inc(nbytes)
        self._of(self._disk_seconds, op).observe(seconds)

    def remote_io(self, op: str, nbytes: int, seconds: float, count: int = 1) -> None:
        """The remote tier answered ``count`` operations in one call (``op``: get, put, or
        lookup: an existence check, which moves no KV)."""
        if op == "lookup":
            self._of(self._remote_lookups).inc(count)
            return
        reads = op == "get"
        self._of(self._remote_reads if reads else self._remote_writes).inc(count)
        self._of(self._remote_read_bytes if reads else self._remote_write_bytes).inc(nbytes)
        self._of(self._remote_get_ms if reads else self._remote_put_ms).observe(seconds * 1000)

    # -- state ---------------------------------------------------------------------------

    def cache_usage(self, used_bytes: int, cached_chunks: int) -> None:
        self._of(self._local_cache).set(used_bytes)
        self._of(self._hot_chunks).set(cached_chunks)

    def pool_capacity(self, nbytes: int) -> None:
        self._of(self._pool_total).set(nbytes)

    def disk_usage(self, nbytes: int) -> None:
        self._of(self._local_storage).set(nbytes)

    def pinned(self, chunks: int) -> None:
        self._of(self._pinned).set(chunks)

    def breaker_open(self, is_open: bool) -> None:
        self._of(self._breaker).set(1 if is_open else 0)

    # -- export --------------------------------------------------------------------------

    def serve(self, port: int) -> None:
        """Expose the metrics on ``port`` until :meth:`close`: this engine's own, or, with
        ``PROMETHEUS_MULTIPROC_DIR`` set, every process's ``lmcache`` metrics (all TP ranks of
        the instance, one scrape)."""
        registry = self.registry
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            registry.register(_Ours(multiprocess.MultiProcessCollector(CollectorRegistry())))
        self._server, _ = start_http_server(port, registry=registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def value(self, name: str, **extra: str) -> float:
        """Current value of a sample, for tests and the CLI (0 when never touched)."""
        got = self.registry.get_sample_value(name, {**self._values, **extra})
        return 0.0 if got is None else got


class _Ours(Collector):
    """Only the ``lmcache`` metrics of a multiprocess collection (vLLM writes its own metrics
    to the same directory and serves them itself)."""

    def __init__(self, inner: Collector) -> None:
        self._inner = inner

    def collect(self) -> Iterable[Metric]:
        return [m for m in self._inner.collect() if m.name.startswith("lmcache")]
