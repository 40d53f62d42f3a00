"""Scheduler side: how much of a prompt the cache holds, and what each step loads and stores.

Runs in vLLM's EngineCore next to its scheduler. Lookups go to the worker's engine when it is
in this process (TP=1, uniprocess executor; hit chunks are then pinned until loaded) and to
worker rank 0's lookup socket otherwise. Only prompt tokens are stored, chunk by chunk as
chunked prefill completes them; the trailing partial chunk with the prompt's last step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmcache.integration.vllm import settings
from lmcache.integration.vllm.lookup import LookupClient
from lmcache.integration.vllm.metadata import LMCacheConnectorMetadata, LoadSpec, RequestOp
from lmcache.integration.vllm.shared import SharedEngine, find
from lmcache.keys import ChunkRange
from lmcache.log import log_lookup

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
    from vllm.v1.request import Request


def cacheable(request: Request | NewRequestData) -> bool:
    """Whether a request's KV is a function of its token ids alone, which chunk keys hash.

    Not so with a LoRA adapter or with multimodal inputs (their placeholder tokens are the
    same for every image): such requests bypass the cache rather than risk wrong KV.
    """
    return request.lora_request is None and not request.mm_features


@dataclass
class _Tracker:
    """A scheduled request: its prompt, blocks, and how much of it the cache holds."""

    prompt: list[int]
    block_ids: list[int]
    stored_end: int
    done: bool = False


class SchedulerConnector:
    def __init__(self, vllm_config: VllmConfig) -> None:
        self.config = settings.engine_config(vllm_config)
        self.instance_id = settings.instance_id(vllm_config)
        self.loads, self.stores = settings.directions(vllm_config)
        self._client: LookupClient | None = None
        self._hits: dict[str, int] = {}
        self._chunks: dict[str, list[ChunkRange]] = {}  # a waiting request's keys, hashed once
        self._plans: dict[str, LoadSpec] = {}
        self._loads: dict[str, LoadSpec] = {}
        self._trackers: dict[str, _Tracker] = {}

    def _shared(self) -> SharedEngine | None:
        return find(self.instance_id)

    def _lookup(self, req_id: str, tokens: list[int]) -> int:
        shared = self._shared()
        if shared is not None:
            chunks = self._chunks.get(req_id)
            if chunks is None:
                chunks = self._chunks[req_id] = shared.engine.chunks(tokens)
            return shared.engine.lookup_chunks(chunks, len(tokens))
        if self._client is None:
            self._client = LookupClient(self.instance_id)
        return self._client.lookup(tokens)

    # -- vLLM's scheduler-side calls ---------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        """Cached tokens beyond vLLM's own prefix-cache hit, leaving at least the last
        prompt token to compute (vLLM needs one to sample from)."""
        tokens = request.prompt_token_ids
        if not tokens or not self.loads or not cacheable(request):
            return 0
        hit = self._lookup(request.request_id, list(tokens))
        load_end = min(hit, request.num_tokens - 1)
        need = max(0, load_end - num_computed_tokens)
        log_lookup(request.request_id, request.num_tokens, hit, need)
        self._hits[request.request_id] = hit
        if need > 0:
            self._plans[request.request_id] = LoadSpec(num_computed_tokens, load_end, hit)
        else:
            self._plans.pop(request.request_id, None)
        return need

    def update_state_after_alloc(self, request: Request, num_external_tokens: int) -> None:
        plan = self._plans.pop(request.request_id, None)
        if plan is None or num_external_tokens <= 0:
            return
        load = LoadSpec(plan.start, plan.start + num_external_tokens, plan.hit)
        self._loads[request.request_id] = load
        shared = self._shared()
        if shared is not None:
            prompt = request.prompt_token_ids or []
            shared.pins.pin(request.request_id, prompt[: load.hit], load.start)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> LMCacheConnectorMetadata:
        meta = LMCacheConnectorMetadata()
        for req_id in getattr(scheduler_output, "preempted_req_ids", None) or ():
            self._release(req_id)
        for req_id in scheduler_output.finished_req_ids:
            self._forget(req_id)
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            if not new.prompt_token_ids or not cacheable(new):
                continue
            tracker = _Tracker(
                list(new.prompt_token_ids),
                list(new.block_ids[0]),
                self._hits.pop(new.req_id, 0),
            )
            previous = self._trackers.get(new.req_id)
            if previous is not None:  # resumed after preemption (vLLM >= 0.26 sends it as new)
                tracker.stored_end = max(tracker.stored_end, previous.stored_end)
                tracker.done = previous.done
            self._trackers[new.req_id] = tracker
            end = new.num_computed_tokens + scheduled[new.req_id]
            self._add_op(meta, new.req_id, tracker, end)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            running = self._trackers.get(req_id)
            if running is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # preempted earlier: all its blocks are new
                running.block_ids = list(new_blocks[0]) if new_blocks else []
                running.stored_end = max(running.stored_end, self._hits.pop(req_id, 0))
            elif new_blocks:
                running.block_ids.extend(new_blocks[0])
            end = cached.num_computed_tokens[i] + scheduled[req_id]
            self._add_op(meta, req_id, running, end)
        return meta

    def _add_op(
        self, meta: LMCacheConnectorMetadata, req_id: str, tracker: _Tracker, end: int
    ) -> None:
        """Queue this step's load and/or store for a request computing tokens ``[.., end)``."""
        load = self._loads.pop(req_id, None)
        prompt_len = len(tracker.prompt)
        store_end: int | None = None
        if self.stores and not tracker.done:
            if end >= prompt_len:
                store_end = prompt_len
                tracker.done = True
            else:
                full = end // self.config.chunk_size * self.config.chunk_size
                if full > tracker.stored_end:
                    store_end = full
        if load is None and store_end is None:
            return
        skip = tracker.stored_end
        if store_end is not None:
            tracker.stored_end = max(tracker.stored_end, store_end)
        upto = max(store_end or 0, load.hit if load else 0)
        meta.requests.append(
            RequestOp(req_id, tracker.prompt[:upto], list(tracker.block_ids), load, skip, store_end)
        )

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request and release its pins; nothing is sent asynchronously."""
        self._forget(request.request_id)
        return False, None

    def _release(self, req_id: str) -> None:
        self._loads.pop(req_id, None)
        self._plans.pop(req_id, None)
        shared = self._shared()
        if shared is not None:
            shared.pins.drop(req_id)

    def _forget(self, req_id: str) -> None:
        self._release(req_id)
        self._hits.pop(req_id, None)
        self._chunks.pop(req_id, None)
        self._trackers.pop(req_id, None)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
