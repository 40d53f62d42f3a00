"""vLLM's own ``Scheduler`` driving our engine through vLLM's built-in ``LMCacheConnectorV1``.

Every scenario ends by checking the KV in the paged cache slot for slot against what the
model computes, so a load that put wrong KV anywhere would fail here.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from vllm.v1.request import Request

from lmcache.integration.vllm.paged import PagedLayout
from lmcache.keys import ChunkRange
from tests.vllm.conftest import BLOCK, CHUNK, CUDA, HEAD_SIZE, HEADS, LAYERS, Rig, RigFactory


def prompt(n: int, seed: int = 0) -> list[int]:
    return [100 + (seed * 7919 + i * 13) % 30000 for i in range(n)]


def serve_then_evict(rig: Rig, req_id: str, tokens: list[int]) -> None:
    """Run a request to completion (storing its KV), then drop it from vLLM's cache."""
    rig.add(req_id, tokens)
    rig.run()
    rig.evict_gpu()


def lookup_line(req: str, total: int, hit: int, need: int) -> str:
    return f"Reqid: {req}, Total tokens {total}, LMCache hit tokens: {hit}, need to load: {need}"


def store_line(req: str, stored: int, total: int) -> str:
    return f"Storing KV cache for {stored} out of {total} tokens for request {req}"


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("layout", list(PagedLayout))
def test_first_request_stores_second_loads(
    rig_factory: RigFactory, lmcache_log: list[str], layout: PagedLayout, async_scheduling: bool
) -> None:
    rig: Rig = rig_factory(layout=layout, async_scheduling=async_scheduling)
    assert type(rig.scheduler).__name__ == ("AsyncScheduler" if async_scheduling else "Scheduler")
    tokens = prompt(150)
    serve_then_evict(rig, "r1", tokens)
    rig.add("r2", tokens)
    first = rig.step()
    rig.run()

    assert lookup_line("r1", 150, 0, 0) in lmcache_log
    # chunked prefill (64 tokens a step): full chunks as they complete, the tail at the end
    assert [store_line("r1", 64, 64), store_line("r1", 64, 128), store_line("r1", 22, 150)] == [
        m for m in lmcache_log if "request r1" in m
    ]
    assert lookup_line("r2", 150, 150, 149) in lmcache_log
    assert store_line("r2", 0, 150) in lmcache_log
    assert first.scheduled_new_reqs[0].num_computed_tokens == 149
    assert first.num_scheduled_tokens["r2"] == 1
    rig.check("r2", 0, 150)
    assert rig.load_errors == [set()] * len(rig.load_errors)


def test_partial_prefix_hit_loads_shared_chunks_and_stores_the_rest(
    rig_factory: RigFactory, lmcache_log: list[str]
) -> None:
    rig: Rig = rig_factory()
    shared = prompt(100)
    serve_then_evict(rig, "r1", [*shared, *prompt(50, seed=1)])
    rig.add("r2", [*shared, *prompt(60, seed=2)])
    rig.run()

    hit = 100 // CHUNK * CHUNK
    assert lookup_line("r2", 160, hit, hit) in lmcache_log
    assert store_line("r2", 160 - hit, 160) in lmcache_log
    rig.check("r2", 0, 160)


def test_two_requests_sharing_a_prefix_in_one_batch(
    rig_factory: RigFactory, lmcache_log: list[str]
) -> None:
    rig: Rig = rig_factory(max_num_batched_tokens=512)
    shared = prompt(100)
    rig.add("r1", [*shared, *prompt(30, seed=1)])
    rig.add("r2", [*shared, *prompt(30, seed=2)])
    step = rig.step()
    assert set(step.num_scheduled_tokens) == {"r1", "r2"}
    rig.run()

    assert lookup_line("r1", 130, 0, 0) in lmcache_log
    assert lookup_line("r2", 130, 0, 0) in lmcache_log
    common = 100 // CHUNK * CHUNK
    assert store_line("r1", 130, 130) in lmcache_log
    assert store_line("r2", 130 - common, 130) in lmcache_log  # shared chunks stored once

    rig.evict_gpu()
    rig.add("r3", [*shared, *prompt(30, seed=2)])
    rig.run()
    assert lookup_line("r3", 130, 130, 129) in lmcache_log
    rig.check("r3", 0, 130)


def test_vllm_prefix_cache_hit_larger_than_ours(
    rig_factory: RigFactory, lmcache_log: list[str]
) -> None:
    rig: Rig = rig_factory({"lmcache.chunk_size": 64, "lmcache.save_unfull_chunk": False})
    tokens = prompt(100)
    rig.add("r1", tokens)
    rig.run()
    rig.add("r2", tokens)  # vLLM still holds 96 tokens in its prefix cache; we hold 64
    first = rig.step()
    rig.run()

    assert [store_line("r1", 64, 64), store_line("r1", 0, 100)] == [
        m for m in lmcache_log if "request r1" in m
    ]
    assert lookup_line("r2", 100, 64, 0) in lmcache_log
    assert first.scheduled_new_reqs[0].num_computed_tokens == 6 * BLOCK
    assert store_line("r2", 0, 100) in lmcache_log
    rig.check("r2", 0, 100)


def pinned_refs(rig: Rig, tokens: list[int]) -> list[int]:
    """The reference count of each cached chunk of ``tokens`` (1 = only the cache holds it)."""
    storage = rig.shared.engine.storage
    buffers = storage.pin_cpu_prefix([c.key for c in rig.shared.engine.chunks(tokens)])
    refs = [b.refs - 1 for b in buffers]
    for buffer in buffers:
        storage.release(buffer)
    return refs


def test_abort_mid_load_releases_pins(rig_factory: RigFactory, lmcache_log: list[str]) -> None:
    rig: Rig = rig_factory()
    tokens = prompt(150)
    serve_then_evict(rig, "r1", tokens)
    rig.add("r2", tokens)
    output = rig.schedule()
    assert lookup_line("r2", 150, 150, 149) in lmcache_log
    assert len(rig.shared.pins) == 5  # pinned from scheduling until the worker loads them
    assert pinned_refs(rig, tokens) == [2] * 5

    rig.abort("r2")
    assert len(rig.shared.pins) == 0
    assert pinned_refs(rig, tokens) == [1] * 5

    rig.scheduler.update_from_output(output, rig.execute(output))  # the step was already sent
    rig.run()
    assert pinned_refs(rig, tokens) == [1] * 5
    assert "r2" not in rig.scheduler.requests


@pytest.mark.parametrize("kept_chunks", [0, 2], ids=["nothing-left", "prefix-left"])
def test_failed_load_reports_blocks_and_vllm_recomputes(
    rig_factory: RigFactory, lmcache_log: list[str], kept_chunks: int
) -> None:
    chunk_bytes = CHUNK * LAYERS * 2 * HEADS * HEAD_SIZE * 4
    rig: Rig = rig_factory({"lmcache.max_local_cpu_size": 6 * chunk_bytes / (1 << 30)})
    tokens = prompt(150)  # 5 chunks: 4 full and a 22-token tail
    serve_then_evict(rig, "r1", tokens)
    rig.add("r2", tokens)
    output = rig.schedule()
    assert output.scheduled_new_reqs[0].num_computed_tokens == 149

    # As on a TP rank whose cache lost chunks after the lookup: unpinned, then evicted. The
    # first ``kept_chunks`` are used last of all, so eviction spares them.
    rig.shared.pins.drop("r2")
    engine = rig.shared.engine
    keys = [c.key for c in engine.chunks(tokens)]
    for buffer in engine.storage.pin_cpu_prefix(keys[:kept_chunks]):
        engine.storage.release(buffer)
    other = prompt((6 - kept_chunks) * CHUNK, seed=9)
    engine.store(other, torch.zeros(engine.spec.shape(len(other))))
    kept = kept_chunks * CHUNK
    assert engine.lookup(tokens) == kept

    rig.scheduler.update_from_output(output, rig.execute(output))
    failed = rig.blocks["r2"][kept // BLOCK : -(-149 // BLOCK)]
    assert rig.load_errors[-1] == set(failed)
    assert rig.scheduler.requests["r2"].num_computed_tokens == kept  # vLLM recomputes the rest
    rig.run()
    rig.check("r2", 0, 150)


def test_module_path_connector(rig_factory: RigFactory, lmcache_log: list[str]) -> None:
    rig: Rig = rig_factory(
        connector="LMCacheKubeConnectorV1", module_path="lmcache.integration.vllm.connector"
    )
    tokens = prompt(90)
    serve_then_evict(rig, "r1", tokens)
    rig.add("r2", tokens)
    rig.run()
    assert lookup_line("r2", 90, 90, 89) in lmcache_log
    rig.check("r2", 0, 90)


def test_preempted_request_resumes_from_the_cache(
    rig_factory: RigFactory, lmcache_log: list[str]
) -> None:
    rig: Rig = rig_factory(num_blocks=13, max_num_batched_tokens=256)  # 12 usable blocks
    rig.add("r1", prompt(80, seed=1), max_tokens=40)
    rig.add("r2", prompt(80, seed=2), max_tokens=40)
    rig.run(max_steps=200)
    assert rig.resumed, "no request was preempted"
    victim = rig.resumed[0]
    lookups = [m for m in lmcache_log if m.startswith(f"Reqid: {victim},")]
    assert len(lookups) >= 2  # looked up again when it came back
    assert ", LMCache hit tokens: 80, need to load: " in lookups[-1]  # its prompt was stored
    assert len(rig.shared.pins) == 0
    assert [m for m in lmcache_log if m.startswith("Storing") and victim in m][-1] == store_line(
        victim, 80, 80
    )  # stored once, not again on resumption
    rig.check(victim, 0, 80)


def test_lora_requests_bypass_the_cache(rig_factory: RigFactory) -> None:
    rig: Rig = rig_factory()
    tokens = prompt(100)
    serve_then_evict(rig, "r1", tokens)
    plain = rig.add("r2", tokens)
    adapted = Request(
        request_id="r3",
        prompt_token_ids=tokens,
        sampling_params=SamplingParams(max_tokens=1),
        pooling_params=None,
        lora_request=LoRARequest("adapter", 1, "/nonexistent"),
    )
    connector = rig.scheduler.connector
    assert connector is not None
    assert connector.get_num_new_matched_tokens(plain, 0) == (99, False)
    assert connector.get_num_new_matched_tokens(adapted, 0) == (0, False)


@pytest.mark.parametrize("kv_role", ["kv_producer", "kv_consumer"])
def test_kv_role_limits_the_direction(
    rig_factory: RigFactory, lmcache_log: list[str], kv_role: str
) -> None:
    rig: Rig = rig_factory(kv_role=kv_role)  # vLLM's own wrapper, as with "kv_both"
    tokens = prompt(100)
    rig.shared.engine.store(tokens[:64], torch.zeros(rig.shared.engine.spec.shape(64)))
    rig.add("r1", tokens)
    rig.run()
    stored = [m for m in lmcache_log if m.startswith("Storing")]
    if kv_role == "kv_producer":  # stores, never loads
        assert lookup_line("r1", 100, 0, 0) not in lmcache_log
        assert stored == [store_line("r1", 0, 64), store_line("r1", 36, 100)]  # 64 were there
    else:  # loads, never stores
        assert lookup_line("r1", 100, 64, 64) in lmcache_log
        assert stored == []


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("layerwise", [False, True], ids=["whole-load", "layerwise"])
@pytest.mark.parametrize("layout", list(PagedLayout))
def test_cuda_paged_cache_end_to_end(
    rig_factory: RigFactory,
    lmcache_log: list[str],
    layout: PagedLayout,
    layerwise: bool,
    device: str,
) -> None:
    """The scenario of the first test on CUDA tensors: side stream, pinned pool, events."""
    rig: Rig = rig_factory({"use_layerwise": layerwise}, layout=layout, device=device)
    tokens = prompt(150)
    serve_then_evict(rig, "r1", tokens)
    rig.add("r2", tokens)
    rig.run()
    assert lookup_line("r2", 150, 150, 149) in lmcache_log
    assert rig.shared.engine.storage.pool.pinned
    rig.check("r2", 0, 150)


def test_reregistered_kv_caches_keep_the_engine(rig_factory: RigFactory) -> None:
    rig: Rig = rig_factory()
    tokens = prompt(90)
    serve_then_evict(rig, "r1", tokens)
    engine = rig.shared.engine
    fresh = {name: torch.full_like(paged, -1) for name, paged in rig.layers.items()}
    rig.worker.register_kv_caches(fresh)  # new tensors, same geometry
    rig.layers = fresh
    assert rig.shared.engine is engine
    rig.add("r2", tokens)
    rig.run()
    rig.check("r2", 0, 90)  # loaded into the new tensors
    with pytest.raises(ValueError, match="same geometry"):
        rig.worker.register_kv_caches({n: p[..., :4] for n, p in fresh.items()})
    rig.evict_gpu()
    rig.add("r3", tokens)
    rig.run()
    rig.check("r3", 0, 90)  # the refused tensors were not taken


def test_a_waiting_request_is_hashed_once(
    rig_factory: RigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM asks again about a waiting request every step; its chunk keys are computed once
    and dropped when the request finishes."""
    rig = rig_factory()
    tokens = prompt(150)
    serve_then_evict(rig, "r1", tokens)
    engine = rig.shared.engine
    hashed: list[int] = []
    real_chunks = engine.chunks

    def counting_chunks(prompt_tokens: list[int]) -> list[ChunkRange]:
        hashed.append(len(prompt_tokens))
        return real_chunks(prompt_tokens)

    monkeypatch.setattr(engine, "chunks", counting_chunks)
    connector = rig.scheduler.connector
    assert connector is not None
    request = rig.make_request("r2", tokens)
    first = connector.get_num_new_matched_tokens(request, 0)
    second = connector.get_num_new_matched_tokens(request, 0)
    assert first == second and first[0] == 149
    assert hashed == [150]
    connector.request_finished(request, [])
    connector.get_num_new_matched_tokens(request, 0)
    assert hashed == [150, 150], "a finished request's keys are not kept"
