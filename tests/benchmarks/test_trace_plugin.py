"""The serving benchmark's trace/verify plugin, on CPU tensors through the real transfer code.

Its verify mode is what tells a wrong load inside a real ``vllm serve`` from a numerical
difference, so it must itself catch a chunk that changed between its store and its load."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from bench_engine import LLAMA_8B
from bench_vllm_transfer import paged_cache

from lmcache.integration.vllm.paged import ChunkJob, PagedTransfer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "plugin"))
import lmcache_trace


def test_verify_mode_passes_exact_round_trips_and_flags_a_changed_chunk(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(PagedTransfer, "store", PagedTransfer.store)
    monkeypatch.setattr(PagedTransfer, "start_load", PagedTransfer.start_load)
    lmcache_trace._install_verify()
    cache, slots = paged_cache(600, torch.device("cpu"))
    transfer = PagedTransfer(cache)
    kv = torch.empty(LLAMA_8B.shape(256), dtype=LLAMA_8B.dtype)
    with caplog.at_level(logging.INFO, logger="lmcache"):
        transfer.store([ChunkJob(kv, 0, 256, slots[:256])])
        transfer.start_load([ChunkJob(kv, 0, 256, slots[256:512])], False)
        assert "MISMATCH" not in caplog.text
        kv[3, 1, 7, 0, 5] += 1  # the pinned chunk changes after its store
        transfer.start_load([ChunkJob(kv, 0, 256, slots[256:512])], False)
    assert "LMCVERIFY MISMATCH load: chunk at" in caplog.text
    assert "changed since its store" in caplog.text


def test_register_does_nothing_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BENCH_TRACE", "BENCH_VERIFY", "BENCH_STAGING_MB"):
        monkeypatch.delenv(name, raising=False)
    store = PagedTransfer.store
    lmcache_trace.register()
    assert PagedTransfer.store is store and not lmcache_trace._installed
