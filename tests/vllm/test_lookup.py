"""The lookup socket a scheduler uses when the engines live in worker processes (TP > 1)."""

from __future__ import annotations

import uuid

import pytest
import torch

from lmcache import KVSpec, LMCacheEngine, LMCacheEngineConfig
from lmcache.integration.vllm import lookup
from lmcache.integration.vllm.lookup import LookupClient, LookupServer
from lmcache.integration.vllm.shared import withdraw
from tests.vllm.conftest import Rig, RigFactory
from tests.vllm.test_scheduler import lookup_line, prompt, serve_then_evict

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_size=8, dtype=torch.float32)


def test_client_gets_the_engines_answer() -> None:
    config = LMCacheEngineConfig.from_mapping({"chunk_size": 16, "max_local_cpu_size": 0.01})
    instance = str(uuid.uuid4())
    with LMCacheEngine(config, SPEC, "lookup-test") as engine:
        tokens = list(range(40))
        engine.store(tokens, torch.ones(SPEC.shape(40)))
        server = LookupServer(engine, instance)
        client = LookupClient(instance)
        try:
            assert client.lookup(tokens) == 40
            assert client.lookup([*tokens[:20], 9, 9, 9]) == 16
            assert client.lookup(list(range(1000, 1010))) == 0
        finally:
            client.close()
            server.close()


@pytest.mark.parametrize("retry_after_s", [3600.0, 0.0], ids=["quiet", "asks-again"])
def test_unanswered_lookup_is_a_miss_then_quiet_for_a_while(
    monkeypatch: pytest.MonkeyPatch, retry_after_s: float
) -> None:
    monkeypatch.setattr(lookup, "LOOKUP_TIMEOUT_MS", 200)
    monkeypatch.setattr(lookup, "RETRY_AFTER_S", retry_after_s)
    config = LMCacheEngineConfig.from_mapping({"chunk_size": 16, "max_local_cpu_size": 0.01})
    instance = str(uuid.uuid4())
    client = LookupClient(instance)
    with LMCacheEngine(config, SPEC, "lookup-test") as engine:
        tokens = list(range(16))
        engine.store(tokens, torch.ones(SPEC.shape(16)))
        assert client.lookup(tokens) == 0  # rank 0 not up yet: a miss after the deadline
        server = LookupServer(engine, instance)
        try:
            answer = client.lookup(tokens)
        finally:
            client.close()
            server.close()
    if retry_after_s:
        assert answer == 0  # still quiet: rank 0 was not asked
        assert not lookups_served(engine)
    else:
        assert answer == 16  # the reset socket reaches the new server
        assert lookups_served(engine) == 1


def lookups_served(engine: LMCacheEngine) -> float | None:
    labels = {"model": "lookup-test", "rank": "0"}
    return engine.metrics.registry.get_sample_value("lmcache_lookups_total", labels)


def test_scheduler_in_another_process_asks_rank_0(
    rig_factory: RigFactory, lmcache_log: list[str]
) -> None:
    rig: Rig = rig_factory(executor_backend="mp")
    transfer = rig.scheduler.vllm_config.kv_transfer_config
    assert transfer is not None
    shared = rig.shared
    withdraw(str(transfer.engine_id), 0)  # as if the worker were another process
    tokens = prompt(120)
    serve_then_evict(rig, "r1", tokens)
    rig.add("r2", tokens)
    output = rig.schedule()
    assert len(shared.pins) == 0  # no pins across processes: a lost chunk is a load error
    rig.scheduler.update_from_output(output, rig.execute(output))
    rig.run()
    assert lookup_line("r2", 120, 120, 119) in lmcache_log
    rig.check("r2", 0, 120)
