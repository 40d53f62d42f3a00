"""Transfer statistics for vLLM's own periodic log line and ``/metrics`` (``KVConnectorStats``).

vLLM already counts the external prefix-cache hits our scheduler answers; these add what the
transfers did since the last report. Only our connector class (``kv_connector_module_path``)
can hand them to vLLM: its built-in LMCache wrapper does not forward connector stats.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

FIELDS = ("loaded_tokens", "loaded_bytes", "load_seconds", "stored_tokens", "stored_bytes")


@dataclass
class TransferStats(KVConnectorStats):
    """Sums over an interval, across TP ranks (bytes and seconds add up per rank)."""

    def __post_init__(self) -> None:
        for name in FIELDS:
            self.data.setdefault(name, 0)

    def record_load(self, tokens: int, nbytes: int, seconds: float) -> None:
        self.data["loaded_tokens"] += tokens
        self.data["loaded_bytes"] += nbytes
        self.data["load_seconds"] += seconds

    def record_store(self, tokens: int, nbytes: int) -> None:
        self.data["stored_tokens"] += tokens
        self.data["stored_bytes"] += nbytes

    def reset(self) -> None:
        self.data = dict.fromkeys(FIELDS, 0)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        return TransferStats({k: self.data[k] + other.data.get(k, 0) for k in FIELDS})

    def reduce(self) -> dict[str, int | float]:
        seconds = self.data["load_seconds"]
        return {
            "LMCache loaded tokens": self.data["loaded_tokens"],
            "LMCache stored tokens": self.data["stored_tokens"],
            "LMCache load GB/s": round(self.data["loaded_bytes"] / seconds / 1e9, 2)
            if seconds
            else 0.0,
        }

    def is_empty(self) -> bool:
        return not (self.data["loaded_tokens"] or self.data["stored_tokens"])
