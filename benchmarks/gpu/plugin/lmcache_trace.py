"""vLLM plugin of the serving benchmark: where our connector's time goes, and whether its bytes
are right, inside a real ``vllm serve`` (ours only; off unless asked for).

``BENCH_TRACE=1``: every worker step that loads or stores logs one ``LMCTRACE step`` line once
its forward has finished (at a later step): wall time at ``start_load_kv``, the CPU time of
issuing the loads and of queueing the stores, and on the GPU (CUDA events on the compute stream)
the wait for the loads and the forward pass; the scheduler logs ``LMCTRACE sched`` lines for
lookups and metadata that cost time.

``BENCH_STAGING_MB=N``: N MiB of device staging per direction instead of the default.

``BENCH_VERIFY=1``: every transfer is checked on the spot (the device synchronized, so timings
are meaningless then): after a store, each pinned chunk equals the paged KV it was copied from,
and its checksum is remembered by pool address; after a load, the paged KV equals the pinned
chunk, and the chunk's checksum equals the one remembered at its store. A mismatch logs
``LMCVERIFY MISMATCH`` with the direction and the chunk's pool address; each checked transfer
logs a count.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import torch

logger = logging.getLogger("lmcache")
_installed: list[str] = []


def _ms(a: torch.cuda.Event, b: torch.cuda.Event) -> float:
    return float(a.elapsed_time(b))


def _event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _checksum(kv: torch.Tensor) -> tuple[int, int]:
    """Two sums of the chunk's 16-bit words on the GPU: plain and position-weighted."""
    words = kv.contiguous().view(torch.int16).flatten().to(torch.int64)
    weights = torch.arange(1, words.numel() + 1, device=words.device, dtype=torch.int64) % 65521
    return int(words.sum()), int((words * weights).sum())


def _install_trace() -> None:
    from lmcache.integration.vllm import scheduler, vllm_v1_adapter

    impl = vllm_v1_adapter.LMCacheConnectorV1Impl
    pending: list[dict[str, Any]] = []
    current: dict[str, Any] = {}

    def flush() -> None:
        """Log the steps whose forward has finished (at a later step: never waits)."""
        while pending and pending[0]["end"].query():
            rec = pending.pop(0)
            rec["end"].synchronize()
            logger.info(
                "LMCTRACE step wall=%.6f loads=%d stores=%d issue_load_ms=%.3f "
                "gpu_load_wait_ms=%.3f gpu_forward_ms=%.3f queue_store_ms=%.3f",
                rec["wall"],
                rec["loads"],
                rec["stores"],
                rec["issue_ms"],
                _ms(rec["before"], rec["after"]),
                _ms(rec["after"], rec["end"]),
                rec["store_ms"],
            )

    original_load = impl.start_load_kv
    original_save = impl.wait_for_save

    @functools.wraps(original_load)
    def start_load_kv(self: Any, forward_context: Any, **kwargs: Any) -> None:
        flush()
        meta = self._metadata()
        current.clear()
        current.update(
            wall=time.time(),
            loads=sum(ld.end - ld.start for ld in meta.loads),
            stores=sum(len(s.chunks) for s in meta.stores),
            before=_event(),
        )
        t0 = time.perf_counter()
        original_load(self, forward_context, **kwargs)
        current["issue_ms"] = (time.perf_counter() - t0) * 1000
        current["after"] = _event()

    @functools.wraps(original_save)
    def wait_for_save(self: Any) -> None:
        if "after" in current and (current["loads"] or current["stores"]):
            current["end"] = _event()
            t0 = time.perf_counter()
            original_save(self)
            current["store_ms"] = (time.perf_counter() - t0) * 1000
            pending.append(dict(current))
            current.clear()
            return
        current.clear()
        original_save(self)

    impl.start_load_kv = start_load_kv  # type: ignore[method-assign]
    impl.wait_for_save = wait_for_save  # type: ignore[method-assign]

    sched = scheduler.SchedulerConnector
    for name in ("get_num_new_matched_tokens", "build_connector_meta"):
        original = getattr(sched, name)

        def timed(self: Any, *args: Any, _original: Any = original, _name: str = name) -> Any:
            t0 = time.perf_counter()
            result = _original(self, *args)
            ms = (time.perf_counter() - t0) * 1000
            if ms > 0.2 or (_name == "get_num_new_matched_tokens" and result):
                logger.info(
                    "LMCTRACE sched wall=%.6f %s ms=%.3f result=%s",
                    time.time(),
                    _name,
                    ms,
                    result if _name == "get_num_new_matched_tokens" else "-",
                )
            return result

        setattr(sched, name, timed)


def _install_verify() -> None:
    from lmcache.integration.vllm import paged

    transfer = paged.PagedTransfer
    stored: dict[int, tuple[int, int]] = {}
    original_store = transfer.store
    original_load = transfer.start_load

    def compare(self: Any, jobs: Any, direction: str) -> None:
        cache = self.cache
        if cache.device.type == "cuda":
            torch.cuda.synchronize(cache.device)
        bad = 0
        for job in jobs:
            index = cache.index(cache.to_device(job.slots))
            paged_kv = torch.stack([cache.read(layer, index) for layer in range(len(cache.layers))])
            pinned = job.kv[:, :, job.lo : job.hi].to(cache.device)
            whole = _checksum(job.kv.to(cache.device))
            if direction == "store":
                stored[job.kv.data_ptr()] = whole
            elif stored.get(job.kv.data_ptr(), whole) != whole:
                bad += 1
                logger.error(
                    "LMCVERIFY MISMATCH load: chunk at %#x changed since its store",
                    job.kv.data_ptr(),
                )
            if not torch.equal(paged_kv, pinned):
                bad += 1
                logger.error(
                    "LMCVERIFY MISMATCH %s: chunk at %#x tokens [%d, %d) differs from the paged KV",
                    direction,
                    job.kv.data_ptr(),
                    job.lo,
                    job.hi,
                )
        logger.info("LMCVERIFY %s chunks=%d mismatches=%d", direction, len(jobs), bad)

    def store(self: Any, jobs: Any) -> Any:
        done = original_store(self, jobs)
        if jobs:
            compare(self, jobs, "store")
        return done

    def start_load(self: Any, jobs: Any, layerwise: bool) -> Any:
        done = original_load(self, jobs, layerwise)
        if jobs:
            compare(self, jobs, "load")
        return done

    transfer.store = store  # type: ignore[method-assign]
    transfer.start_load = start_load  # type: ignore[method-assign]


def register() -> None:
    """vLLM's general-plugin hook (every process of every server): nothing unless asked for,
    and only where our connector's modules exist (not upstream LMCache's)."""
    staging_mb = os.environ.get("BENCH_STAGING_MB")
    trace = os.environ.get("BENCH_TRACE") == "1"
    verify = os.environ.get("BENCH_VERIFY") == "1"
    if _installed or not (staging_mb or trace or verify):
        return
    try:
        import lmcache.integration.vllm.vllm_v1_adapter  # noqa: F401
        from lmcache.integration.vllm import paged
    except ImportError:
        return
    _installed.append("yes")
    if staging_mb:
        defaults = paged.PagedTransfer.__init__.__defaults__ or ()
        paged.PagedTransfer.__init__.__defaults__ = (int(staging_mb) << 20, *defaults[1:])
    if trace:
        _install_trace()
    if verify:
        _install_verify()
