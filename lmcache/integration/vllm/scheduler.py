"""Scheduler side: how much of a prompt the cache can deliver, and what each step moves.

Runs in vLLM's EngineCore next to its scheduler and owns every per-request decision. A
request's chunk digests are computed once, when vLLM first asks about it. The first answer
comes from every worker rank (:mod:`rpc`), each of which pins the chunks it holds in its CPU
pool and stages into the pool what its disk or remote tier holds after them; until staging is
done (or ``max_stage_wait_ms`` has passed) vLLM is told to ask again (``None``). The promise
is the run of chunks pinned on *every* rank, so a load can always be served: with vLLM's
default ``kv_load_failure_policy: fail`` no request fails because of the cache.

Each step ships only what changes: the chunks a request loads now, and the chunks its forward
pass completed (full chunks as chunked prefill completes them, the trailing partial one with
the prompt's last step). A request that had stores is kept by vLLM after it finishes until
every rank reports its stores landed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from lmcache.integration.vllm import settings
from lmcache.integration.vllm.events import ChunkEvent, Hash
from lmcache.integration.vllm.metadata import (
    BlockSpan,
    LMCacheConnectorMetadata,
    LoadSpec,
    StoreSpec,
)
from lmcache.integration.vllm.rpc import Answer, RankClient
from lmcache.keys import ChunkRange, chunk_digests
from lmcache.log import log_lookup

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

RANK_TIMEOUT_MS = 5000
"""A rank answers from memory (plus a remote lookup under its own deadline): one that takes
longer is busy starting up or gone, and its answer counts as a miss."""


@dataclass(frozen=True)
class _EventSource:
    """A request's vLLM block hashes (as vLLM's own events carry them), prompt and adapter."""

    block_hashes: tuple[Hash, ...]
    prompt: tuple[int, ...]
    lora_id: int | None
    lora_name: str | None

    def chunk(self, chunk: ChunkRange, block_size: int) -> ChunkEvent | None:
        """The event description of a chunk's full blocks (None: it has none)."""
        first, last = chunk.start // block_size, chunk.end // block_size
        if last <= first or last > len(self.block_hashes):
            return None
        return ChunkEvent(
            self.block_hashes[first:last],
            self.block_hashes[first - 1] if first else None,
            self.prompt[first * block_size : last * block_size],
            block_size,
            self.lora_id,
            self.lora_name,
        )

    @classmethod
    def of(cls, request: Request) -> _EventSource:
        lora = request.lora_request
        return cls(
            tuple(maybe_convert_block_hash(h) for h in request.block_hashes),
            tuple(request.prompt_token_ids or ()),
            lora.adapter_id if lora else None,
            lora.name if lora else None,
        )


@dataclass
class _Request:
    """The scheduler's view of one request."""

    digests: list[ChunkRange]
    """Digest ranges of the prompt's storable chunks, computed once."""
    prompt_len: int
    answers: list[Answer] | None = None
    """Every rank's answer while it holds pins for this request."""
    asked_at: float = 0.0
    hit: int = 0
    """Tokens ``[0, hit)`` that every rank can deliver (for the log line and the stores)."""
    external: int = 0
    """Tokens vLLM agreed to load, not yet shipped."""
    logged: bool = False
    block_ids: list[int] = field(default_factory=list)
    cursor: int = 0
    """Chunks ending at or before this token are stored (or held) already."""
    stored: bool = False
    """A store was shipped: vLLM must keep the blocks until the ranks report it landed."""
    events: _EventSource | None = None
    """With KV events on: what each chunk's events need (vLLM's block hashes, tokens)."""

    @property
    def staging(self) -> bool:
        return self.answers is not None and any(a.staging for a in self.answers)

    def ready(self) -> int:
        """Chunks from the first pinned on every rank."""
        return min((a.ready for a in self.answers or ()), default=0)


class SchedulerConnector:
    def __init__(self, vllm_config: VllmConfig) -> None:
        self.config = settings.engine_config(vllm_config)
        self.instance_id = settings.instance_id(vllm_config)
        self.loads, self.stores = settings.directions(vllm_config)
        self.block_size = vllm_config.cache_config.block_size
        self.kv_events = settings.kv_events(vllm_config)
        timeout = max(RANK_TIMEOUT_MS, 2 * self.config.remote_timeout_ms)
        self._ranks = RankClient(self.instance_id, settings.world_size(vllm_config), timeout)
        self._requests: dict[str, _Request] = {}

    # -- vLLM's scheduler-side calls ---------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int | None:
        """Cached tokens beyond vLLM's own prefix-cache hit that every rank has pinned,
        leaving at least the last prompt token to compute (vLLM needs one to sample from);
        None while chunks are still being staged from disk/remote (vLLM asks again)."""
        state = self._state(request)
        if state is None or not self.loads or settings.skips_reading(request):
            return 0
        if state.answers is None:
            state.answers = self._ranks.lookup(request.request_id, state.digests)
            state.asked_at = time.monotonic()
        elif state.staging:
            state.answers = self._ranks.status(request.request_id)
        waited_ms = (time.monotonic() - state.asked_at) * 1000
        if state.staging and waited_ms < self.config.max_stage_wait_ms:
            return None
        ready = state.ready()
        state.hit = state.digests[ready - 1].end if ready else 0
        need = max(0, min(state.hit, request.num_tokens - 1) - num_computed_tokens)
        if not state.logged:
            log_lookup(request.request_id, request.num_tokens, state.hit, need)
            state.logged = True
        return need

    def _state(self, request: Request) -> _Request | None:
        """The request's state, its digests computed on first sight; None if bypassed."""
        state = self._requests.get(request.request_id)
        if state is None and not settings.bypassed(request):
            prompt = list(request.prompt_token_ids or ())
            digests = chunk_digests(
                prompt,
                self.config.chunk_size,
                self.config.save_unfull_chunk,
                settings.context(request),
            )
            state = self._requests[request.request_id] = _Request(digests, len(prompt))
            if self.kv_events:
                state.events = _EventSource.of(request)
        return state

    def update_state_after_alloc(self, request: Request, num_external_tokens: int) -> None:
        state = self._requests.get(request.request_id)
        if state is None:
            return
        if num_external_tokens > 0:
            state.external = num_external_tokens
        else:  # nothing to load after all: unpin now
            self._release(request.request_id, state)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> LMCacheConnectorMetadata:
        meta = LMCacheConnectorMetadata()
        for req_id in scheduler_output.preempted_req_ids or ():
            state = self._requests.get(req_id)
            if state is not None:
                meta.preempted.append(req_id)
                state.block_ids = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            state.cursor = state.hit  # chunks every rank holds need no store
            self._step(meta, new.req_id, state, new.num_computed_tokens, scheduled[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # after preemption: all its blocks are new
                state.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                state.block_ids.extend(new_blocks[0])
            computed = cached.num_computed_tokens[i]
            # Computed tokens only go back when vLLM recomputes (a failed load, preemption):
            # the chunks computed again are stored again.
            state.cursor = min(state.cursor, computed)
            self._step(meta, req_id, state, computed, scheduled[req_id])
        return meta

    def _step(
        self,
        meta: LMCacheConnectorMetadata,
        req_id: str,
        state: _Request,
        computed: int,
        num_scheduled: int,
    ) -> None:
        """A request's load (tokens vLLM counted as computed but we must write) and the
        stores of the chunks its forward pass completes in this step."""
        if state.external:
            start, end = computed - state.external, computed
            last = (end - 1) // self.config.chunk_size
            chunks = tuple(state.digests[: last + 1])
            blocks = BlockSpan.covering(state.block_ids, self.block_size, start, end)
            meta.loads.append(LoadSpec(req_id, chunks, start, end, blocks))
            state.external = 0
            state.answers = None  # the ranks' pins now belong to this load
        if not self.stores:
            return
        done = min(computed + num_scheduled, state.prompt_len)
        chunks = tuple(c for c in state.digests if state.cursor < c.end <= done)
        if not chunks:
            return
        blocks = BlockSpan.covering(state.block_ids, self.block_size, chunks[0].start, done)
        source = state.events
        events = tuple(source.chunk(c, self.block_size) for c in chunks) if source else ()
        meta.stores.append(StoreSpec(req_id, chunks, blocks, done, events))
        state.cursor = chunks[-1].end
        state.stored = True

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request and release its pins. True (keep the blocks) when stores were
        shipped for it: every rank reports it in ``get_finished`` once they have landed."""
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return False, None
        self._release(request.request_id, state)
        return state.stored, None

    def _release(self, req_id: str, state: _Request) -> None:
        if state.answers is not None:
            self._ranks.release(req_id)
            state.answers = None

    def close(self) -> None:
        self._ranks.close()
