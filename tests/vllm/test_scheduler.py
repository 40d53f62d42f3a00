"""vLLM's own ``Scheduler`` driving our engine through vLLM's built-in ``LMCacheConnectorV1``.

Every scenario checks the KV in the paged cache against a forward pass over the whole
sequence, what the engine stored against the same, and that nothing is left pinned or in
flight. The rig runs vLLM's default ``kv_load_failure_policy: fail``.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.v1.engine import FinishReason

from lmcache.integration.vllm import scheduler as scheduler_module
from lmcache.integration.vllm import settings
from lmcache.integration.vllm.metadata import LMCacheConnectorMetadata
from lmcache.integration.vllm.paged import PagedLayout
from lmcache.keys import KVContext
from tests.vllm.conftest import (
    BLOCK,
    CHUNK,
    CUDA,
    DEVICES,
    HEAD_SIZE,
    HEADS,
    LAYERS,
    Rig,
    RigFactory,
)


def prompt(n: int, seed: int = 0) -> list[int]:
    return [100 + (seed * 7919 + i * 13) % 30000 for i in range(n)]


def serve_then_evict(rig: Rig, req_id: str, tokens: list[int], **extra: object) -> None:
    """Run a request to completion (storing its KV), then drop it from vLLM's cache."""
    rig.add(req_id, tokens, **extra)
    rig.run()
    rig.evict_gpu()


def lookup_line(req: str, total: int, hit: int, need: int) -> str:
    return f"Reqid: {req}, Total tokens {total}, LMCache hit tokens: {hit}, need to load: {need}"


def store_line(req: str, stored: int, total: int) -> str:
    return f"Storing KV cache for {stored} out of {total} tokens for request {req}"


def no_errors(rig: Rig) -> None:
    assert FinishReason.ERROR not in rig.finished.values(), rig.finished
    assert rig.load_errors == [set()] * len(rig.load_errors)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("layout", list(PagedLayout))
def test_first_request_stores_second_loads(
    rig_factory: RigFactory, lmcache_log: list[str], layout: PagedLayout, async_scheduling: bool
) -> None:
    rig: Rig = rig_factory(layout=layout, async_scheduling=async_scheduling)
    assert type(rig.scheduler).__name__ == ("AsyncScheduler" if async_scheduling else "Scheduler")
    tokens = prompt(150)
    serve_then_evict(rig, "r1", tokens)
    assert rig.check_stored(tokens) == 5
    rig.add("r2", tokens)
    first = rig.step()
    rig.run()

    assert lookup_line("r1", 150, 0, 0) in lmcache_log
    # chunked prefill (64 tokens a step): full chunks as they complete, the tail at the end
    assert [store_line("r1", 64, 64), store_line("r1", 64, 128), store_line("r1", 22, 150)] == [
        m for m in lmcache_log if "request r1" in m
    ]
    assert lookup_line("r2", 150, 150, 149) in lmcache_log
    assert not [m for m in lmcache_log if m.startswith("Storing") and "r2" in m]
    assert first.scheduled_new_reqs[0].num_computed_tokens == 149
    assert first.num_scheduled_tokens["r2"] == 1
    rig.check("r2", 0, 150)
    no_errors(rig)
    rig.no_leaks()


def test_partial_prefix_hit_loads_shared_chunks_and_stores_the_rest(
    rig_factory: RigFactory, lmcache_log: list[str]
) -> None:
    rig: Rig = rig_factory()
    shared = prompt(100)
    serve_then_evict(rig, "r1", [*shared, *prompt(50, seed=1)])
    second = [*shared, *prompt(60, seed=2)]
    rig.add("r2", second)
    rig.run()

    hit = 100 // CHUNK * CHUNK
    assert lookup_line("r2", 160, hit, hit) in lmcache_log
    assert store_line("r2", 160 - hit, 160) in lmcache_log
    rig.check("r2", 0, 160)
    assert rig.check_stored(second) == 5
    no_errors(rig)
    rig.no_leaks()


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

    common = 100 // CHUNK * CHUNK
    assert store_line("r1", 130, 130) in lmcache_log
    assert store_line("r2", 130 - common, 130) in lmcache_log  # shared chunks stored once

    rig.evict_gpu()
    rig.add("r3", [*shared, *prompt(30, seed=2)])
    rig.run()
    assert lookup_line("r3", 130, 130, 129) in lmcache_log
    rig.check("r3", 0, 130)
    no_errors(rig)
    rig.no_leaks()


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

    assert [store_line("r1", 64, 64)] == [m for m in lmcache_log if "request r1" in m]
    assert lookup_line("r2", 100, 64, 0) in lmcache_log
    assert first.scheduled_new_reqs[0].num_computed_tokens == 6 * BLOCK
    rig.check("r2", 0, 100)
    no_errors(rig)
    rig.no_leaks()


def test_abort_after_the_load_was_scheduled_leaks_nothing(
    rig_factory: RigFactory, lmcache_log: list[str]
) -> None:
    rig: Rig = rig_factory()
    tokens = prompt(150)
    serve_then_evict(rig, "r2-source", tokens)
    rig.add("r2", tokens)
    output = rig.schedule()
    assert lookup_line("r2", 150, 150, 149) in lmcache_log
    assert len(rig.connector.pins) == 5  # pinned from the lookup until the worker loads them

    rig.abort("r2")
    rig.update(output, rig.execute(output))  # the step was already sent: it still loads
    rig.run()
    assert "r2" not in rig.scheduler.requests
    rig.no_leaks()


def test_abort_before_scheduling_releases_the_pins(rig_factory: RigFactory) -> None:
    rig: Rig = rig_factory()
    tokens = prompt(150)
    serve_then_evict(rig, "r1", tokens)
    connector = rig.scheduler.connector
    assert connector is not None
    request = rig.add("r2", tokens)
    assert connector.get_num_new_matched_tokens(request, 0) == (149, False)
    assert len(rig.connector.pins) == 5
    rig.abort("r2")
    rig.run()
    rig.no_leaks()


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
    no_errors(rig)
    rig.no_leaks()


def test_preempted_request_resumes_from_the_cache(
    rig_factory: RigFactory, lmcache_log: list[str]
) -> None:
    rig: Rig = rig_factory(num_blocks=13, max_num_batched_tokens=256)  # 12 usable blocks
    rig.add("r1", prompt(80, seed=1), max_tokens=40)
    rig.add("r2", prompt(80, seed=2), max_tokens=40)
    rig.run()
    assert rig.resumed, "no request was preempted"
    victim = rig.resumed[0]
    lookups = [m for m in lmcache_log if m.startswith(f"Reqid: {victim},")]
    assert len(lookups) == 1, "the lookup line is logged once per request"
    stores = [m for m in lmcache_log if m.startswith("Storing") and victim in m]
    assert sum(int(m.split()[4]) for m in stores) == 80, "its prompt is stored once"
    rig.check(victim, 0, 80)
    assert rig.check_stored(prompt(80, seed=1)) == 3
    no_errors(rig)
    rig.no_leaks()


def test_tenants_adapters_and_images_get_their_own_keys(
    rig_factory: RigFactory, lmcache_log: list[str]
) -> None:
    """cache_salt isolates tenants; a LoRA adapter or an image changes KV, so each is keyed:
    a request hits only KV made with the same salt, adapter and image."""
    rig: Rig = rig_factory()
    tokens = prompt(100)
    lora = LoRARequest("adapter", 1, "/nonexistent")
    serve_then_evict(rig, "salted", tokens, cache_salt="tenant-a")
    image = [MultiModalFeatureSpec(None, "image", "img-a", PlaceholderRange(offset=40, length=8))]
    # Image and adapter requests need a model that takes them: store their KV as the worker
    # would, under the keys the scheduler computes for such requests.
    for extra in ({"lora_request": lora}, {"mm_features": image}):
        context = settings.context(rig.make_request("x", tokens, **extra))  # type: ignore[arg-type]
        rig.engine.store(tokens, rig.engine_kv(tokens), context=context)
    connector = rig.scheduler.connector
    assert connector is not None

    def hit(**extra: object) -> int:
        request = rig.make_request(f"probe-{len(lmcache_log)}", tokens, **extra)  # type: ignore[arg-type]
        found = connector.get_num_new_matched_tokens(request, 0)[0]
        connector.request_finished(request, [])
        assert found is not None
        return found

    assert hit() == 32, "only the image request's chunk before the image is plain KV"
    assert hit(cache_salt="tenant-a") == 99
    assert hit(cache_salt="tenant-b") == 0
    assert hit(lora_request=lora) == 99
    assert hit(lora_request=LoRARequest("other", 2, "/nonexistent")) == 0
    assert hit(mm_features=image) == 99
    other_image = [
        MultiModalFeatureSpec(None, "image", "img-b", PlaceholderRange(offset=40, length=8))
    ]
    assert hit(mm_features=other_image) == 32, "chunks before the image are shared"
    assert rig.check_stored(tokens, KVContext(cache_salt="tenant-a")) == 4
    rig.no_leaks()


def test_prompt_logprob_requests_never_read_but_store(
    rig_factory: RigFactory, lmcache_log: list[str]
) -> None:
    rig: Rig = rig_factory()
    tokens = prompt(100)
    serve_then_evict(rig, "r1", tokens)
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    request = rig.make_request("r2", tokens)
    request.sampling_params = params
    request.skip_reading_prefix_cache = request.get_skip_reading_prefix_cache()
    assert request.skip_reading_prefix_cache
    connector = rig.scheduler.connector
    assert connector is not None
    assert connector.get_num_new_matched_tokens(request, 0) == (0, False)
    rig.no_leaks()


def test_prompt_embeds_bypass_the_cache(rig_factory: RigFactory) -> None:
    """Placeholder token ids stand for embeddings the keys cannot see: never read, never
    stored."""
    rig: Rig = rig_factory()
    tokens = prompt(64)
    request = rig.make_request("r1", tokens, prompt_embeds=torch.zeros(64, 8))
    connector = rig.scheduler.connector
    assert connector is not None
    assert connector.get_num_new_matched_tokens(request, 0) == (0, False)
    assert connector.request_finished(request, []) == (False, None)
    assert len(rig.engine.storage.cpu) == 0


@pytest.mark.parametrize("kv_role", ["kv_producer", "kv_consumer"])
def test_kv_role_limits_the_direction(
    rig_factory: RigFactory, lmcache_log: list[str], kv_role: str
) -> None:
    rig: Rig = rig_factory(kv_role=kv_role)  # vLLM's own wrapper, as with "kv_both"
    tokens = prompt(100)
    rig.add("warm", tokens[:64], max_tokens=1)
    if kv_role == "kv_consumer":  # nothing stores here: put the prefix in directly
        rig.engine.store(tokens[:64], rig.engine_kv(tokens[:64]))
    rig.run()
    rig.evict_gpu()
    rig.add("r1", tokens)
    rig.run()
    stored = [m for m in lmcache_log if m.startswith("Storing") and "r1" in m]
    if kv_role == "kv_producer":  # stores, never loads
        assert not [m for m in lmcache_log if m.startswith("Reqid: r1,")]
        # the first 64 were stored by "warm"
        assert stored == [store_line("r1", 0, 64), store_line("r1", 36, 100)]
    else:  # loads, never stores
        assert lookup_line("r1", 100, 64, 64) in lmcache_log
        assert stored == []
    rig.check("r1", 0, 100)
    rig.no_leaks()


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
    """The scenario of the first test on CUDA tensors: side streams, pinned pool, events,
    stores published after they landed, finished requests kept until then."""
    rig: Rig = rig_factory({"use_layerwise": layerwise}, layout=layout, device=device)
    tokens = prompt(150)
    serve_then_evict(rig, "r1", tokens)
    rig.add("r2", tokens)
    rig.run()
    assert lookup_line("r2", 150, 150, 149) in lmcache_log
    assert rig.engine.storage.pool.pinned
    rig.check("r2", 0, 150)
    assert rig.check_stored(tokens) == 5
    no_errors(rig)
    rig.no_leaks()


def test_reregistered_kv_caches_keep_the_engine(rig_factory: RigFactory) -> None:
    rig: Rig = rig_factory()
    tokens = prompt(90)
    serve_then_evict(rig, "r1", tokens)
    engine = rig.engine
    fresh = {name: torch.full_like(paged, -1) for name, paged in rig.layers.items()}
    rig.worker.register_kv_caches(fresh)  # new tensors, same geometry
    rig.layers = fresh
    assert rig.engine is engine
    rig.add("r2", tokens)
    rig.run()
    rig.check("r2", 0, 90)  # loaded into the new tensors
    with pytest.raises(ValueError, match="same geometry"):
        rig.worker.register_kv_caches({n: p[..., :4] for n, p in fresh.items()})
    rig.evict_gpu()
    rig.add("r3", tokens)
    rig.run()
    rig.check("r3", 0, 90)  # the refused tensors were not taken


def test_a_waiting_request_is_hashed_and_looked_up_once(
    rig_factory: RigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM asks again about a waiting request every step: its digests are computed once,
    the ranks asked once, and both are dropped when the request finishes."""
    rig = rig_factory()
    tokens = prompt(150)
    serve_then_evict(rig, "r1", tokens)
    hashed: list[int] = []
    real = scheduler_module.chunk_digests

    def counting(tokens: list[int], *args: object, **kwargs: object) -> object:
        hashed.append(len(tokens))
        return real(tokens, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(scheduler_module, "chunk_digests", counting)
    connector = rig.scheduler.connector
    assert connector is not None
    request = rig.make_request("r2", tokens)
    lookups = rig.engine.metrics.value("lmcache:num_lookup_requests_total")
    first = connector.get_num_new_matched_tokens(request, 0)
    second = connector.get_num_new_matched_tokens(request, 0)
    assert first == second == (149, False)
    assert hashed == [150]
    assert rig.engine.metrics.value("lmcache:num_lookup_requests_total") == lookups + 1
    connector.request_finished(request, [])
    connector.get_num_new_matched_tokens(request, 0)
    assert hashed == [150, 150], "a finished request's digests are not kept"
    connector.request_finished(request, [])
    rig.no_leaks()


def test_each_step_ships_only_its_new_chunks(
    rig_factory: RigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-step work is O(new chunks): a long prompt's chunked prefill ships each chunk once,
    and no step carries the prompt's tokens or its whole block table."""
    rig: Rig = rig_factory(max_num_batched_tokens=64)
    shipped: list[LMCacheConnectorMetadata] = []
    connector = rig.scheduler.connector
    assert connector is not None
    real = connector.build_connector_meta

    def spy(output: object) -> LMCacheConnectorMetadata:
        meta = real(output)  # type: ignore[arg-type]
        shipped.append(meta)
        return meta

    monkeypatch.setattr(connector, "build_connector_meta", spy)
    tokens = prompt(640)
    rig.add("r1", tokens)
    rig.run()
    chunks = [c for meta in shipped for spec in meta.stores for c in spec.chunks]
    assert [c.start for c in chunks] == list(range(0, 640, CHUNK))
    for meta in shipped:
        for spec in meta.stores:
            assert len(spec.blocks.block_ids) <= -(-len(spec.chunks) * CHUNK // BLOCK) + 1
    rig.no_leaks()


def test_preemptions_reach_the_worker_through_vllms_own_wrapper(
    rig_factory: RigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's runner calls handle_preemptions before it zeroes freed blocks; its LMCache
    wrapper does not forward it, so the connector gives the wrapper instance that forward."""
    rig: Rig = rig_factory()
    seen: list[list[str]] = []
    monkeypatch.setattr(
        rig.connector, "handle_preemptions", lambda meta: seen.append(list(meta.preempted))
    )
    rig.worker.handle_preemptions(LMCacheConnectorMetadata(preempted=["r9"]))
    assert seen == [["r9"]]


def test_our_connector_class_reports_transfer_stats_to_vllms_logger(
    rig_factory: RigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's periodic "KV Transfer metrics" line, fed the way vLLM feeds it: the worker's
    stats travel in the step's output, the logger rebuilds them with our class."""
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging

    rig: Rig = rig_factory(
        connector="LMCacheKubeConnectorV1", module_path="lmcache.integration.vllm.connector"
    )
    seen: list[dict[str, object]] = []
    real = rig.execute

    def collect(output: object) -> object:
        result = real(output)  # type: ignore[arg-type]
        stats = result.kv_connector_output.kv_connector_stats  # type: ignore[attr-defined]
        if stats is not None:
            seen.append(stats.data)
        return result

    monkeypatch.setattr(rig, "execute", collect)
    tokens = prompt(150)
    serve_then_evict(rig, "r1", tokens)
    rig.add("r2", tokens)
    rig.run()
    logging = KVConnectorLogging(rig.scheduler.vllm_config.kv_transfer_config)
    for data in seen:
        logging.observe(data)
    lines: list[str] = []
    logging.log(lambda fmt, *args: lines.append(fmt % args))
    assert len(lines) == 1
    assert "LMCache loaded tokens=149" in lines[0] and "LMCache stored tokens=150" in lines[0]


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_prompts_under_eviction_pressure_load_exact_kv(
    rig_factory: RigFactory, device: str
) -> None:
    """The serving benchmark's sequence: each prompt computed with 16 output tokens, vLLM's
    prefix cache reset, then the same prompt again, loaded from a pool too small for all of
    them, so that every store evicts older chunks. Every warm request holds exactly the KV of
    a forward pass, and nothing is left pinned."""
    chunk_bytes = CHUNK * LAYERS * 2 * HEADS * HEAD_SIZE * 4  # float32 paged cache
    rig: Rig = rig_factory(
        {"lmcache.max_local_cpu_size": 12 * chunk_bytes / 2**30}, device=device, num_blocks=64
    )
    for n in range(6):
        tokens = prompt(4 * CHUNK + 17, seed=n)  # 4 full chunks and a partial one
        rig.add(f"cold{n}", tokens, max_tokens=16)
        rig.run()
        rig.evict_gpu()
        rig.add(f"warm{n}", tokens, max_tokens=16)
        first = rig.step()
        rig.run()
        assert first.scheduled_new_reqs[0].num_computed_tokens == len(tokens) - 1, n
        rig.check(f"warm{n}", 0, len(tokens))
    no_errors(rig)
    rig.no_leaks()
