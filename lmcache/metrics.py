"""Prometheus metrics of one engine, in a registry of its own.

A registry per engine keeps several engines in one process (tests, TP ranks in one process)
from colliding; ``metrics_port`` serves it over HTTP.
"""

from __future__ import annotations

from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

MetricT = TypeVar("MetricT", Counter, Gauge, Histogram)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class EngineMetrics:
    """Counters and gauges that say whether the cache is earning its memory."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.registry = CollectorRegistry()
        self._server: WSGIServer | None = None
        names = sorted(labels)
        self._labels = labels
        r = self.registry

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"lmcache_{name}", doc, [*names, *extra], registry=r)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"lmcache_{name}", doc, [*names, *extra], registry=r)

        self.lookups = counter("lookups", "lookup requests")
        self.lookup_tokens = counter("lookup_tokens", "tokens asked for in lookups")
        self.hit_tokens = counter("hit_tokens", "tokens found by lookups (longest cached prefix)")
        self.stored_tokens = counter("stored_tokens", "tokens newly stored")
        self.stored_bytes = counter("stored_bytes", "KV bytes newly stored")
        self.retrieved_tokens = counter("retrieved_tokens", "tokens retrieved")
        self.retrieved_bytes = counter("retrieved_bytes", "KV bytes retrieved")
        self.evictions = counter("evictions", "chunks evicted", ("tier",))
        self.skipped_stores = counter(
            "skipped_stores", "chunks not stored because no memory could be freed"
        )
        self.tier_hits = counter("tier_hit_chunks", "chunks served per tier", ("tier",))
        self.tier_errors = counter(
            "tier_errors", "failed operations per tier (each became a miss)", ("tier", "op")
        )
        self.corrupt = counter("corrupt_values", "values refused by validation", ("tier",))
        self.dropped_writes = counter(
            "dropped_writes", "background writes dropped (queue full or tier down)", ("tier",)
        )
        self.tier_ops = counter("tier_ops", "lower-tier operations", ("tier", "op"))
        self.tier_bytes = counter("tier_bytes", "bytes moved to/from a tier", ("tier", "op"))
        self.tier_latency = Histogram(
            "lmcache_tier_latency_seconds",
            "lower-tier operation latency",
            [*names, "tier", "op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pool_used_bytes = gauge("pool_used_bytes", "pinned pool bytes in use")
        self.pool_total_bytes = gauge("pool_total_bytes", "pinned pool capacity in bytes")
        self.cpu_cached_chunks = gauge("cpu_cached_chunks", "chunks in the CPU hot cache")
        self.disk_bytes = gauge("disk_bytes", "bytes in the local disk tier")
        self.breaker_open = gauge(
            "remote_breaker_open", "1 while the remote tier is skipped after failures", ()
        )

    def labels(self, metric: MetricT, *extra: str) -> MetricT:
        """The child of ``metric`` for this engine (plus any extra label values)."""
        return metric.labels(*[self._labels[k] for k in sorted(self._labels)], *extra)

    def serve(self, port: int) -> None:
        """Expose the registry on ``port`` until :meth:`close`."""
        self._server, _ = start_http_server(port, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def value(self, name: str, **extra: str) -> float:
        """Current value of a sample, for tests and the CLI (0 when never touched)."""
        got = self.registry.get_sample_value(name, {**self._labels, **extra})
        return 0.0 if got is None else got
