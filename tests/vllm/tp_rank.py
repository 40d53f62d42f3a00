"""One TP rank in its own process, for the two-rank tests: vLLM's real distributed groups
(gloo on CPU), vLLM's connector factory building our worker side, CPU paged caches, and the
model runner's connector lifecycle. The test process runs the scheduler and sends each step's
``SchedulerOutput`` to every rank over a pipe, as vLLM's multiprocess executor does.
"""

from __future__ import annotations

import os
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch


def serve(
    rank: int, port: int, model_dir: Path, engine_id: str, extra: dict[str, Any], pipe: Connection
) -> None:
    """A rank's main loop: ``(command, args)`` in, ``(ok, result)`` out."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        rank_state = _Rank(rank, port, model_dir, engine_id, extra)
        pipe.send((True, None))
    except Exception:
        pipe.send((False, traceback.format_exc()))
        return
    while True:
        command, args = pipe.recv()
        if command == "close":
            rank_state.close()
            pipe.send((True, None))
            return
        try:
            pipe.send((True, getattr(rank_state, command)(*args)))
        except Exception:
            pipe.send((False, traceback.format_exc()))


class _Rank:
    def __init__(
        self, rank: int, port: int, model_dir: Path, engine_id: str, extra: dict[str, Any]
    ) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.distributed import init_distributed_environment, initialize_model_parallel
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

        from tests.vllm.conftest import (
            PagedLayout,
            SlotIO,
            make_kv_cache_config,
            make_paged,
            make_vllm_config,
        )

        self.rank = rank
        self.vllm_config = make_vllm_config(
            model_dir, extra, tensor_parallel_size=2, engine_id=engine_id
        )
        with set_current_vllm_config(self.vllm_config):
            init_distributed_environment(
                world_size=2,
                rank=rank,
                distributed_init_method=f"tcp://127.0.0.1:{port}",
                local_rank=rank,
                backend="gloo",
            )
            initialize_model_parallel(tensor_model_parallel_size=2)
        kv_cache_config = make_kv_cache_config(256)
        self.connector = KVConnectorFactory.create_connector(
            self.vllm_config, KVConnectorRole.WORKER, kv_cache_config
        )
        names = kv_cache_config.kv_cache_groups[0].layer_names
        self.layers = {name: make_paged(PagedLayout.BLOCK_FIRST, 256) for name in names}
        self.connector.register_kv_caches(self.layers)
        self.io = SlotIO(PagedLayout.BLOCK_FIRST)
        self.blocks: dict[str, list[int]] = {}
        self.tokens: dict[str, list[int]] = {}

    @property
    def worker(self) -> Any:
        return self.connector._lmcache_engine.worker  # type: ignore[attr-defined]

    def slots(self, req_id: str, end: int) -> torch.Tensor:
        blocks = torch.tensor(self.blocks[req_id], dtype=torch.long)
        positions = torch.arange(end)
        return blocks[positions // 16] * 16 + positions % 16

    def step(self, output: Any, tokens: dict[str, list[int]]) -> Any:
        """One step of the model runner: the connector lifecycle around the forward pass."""
        from vllm.distributed.kv_transfer import kv_transfer_state
        from vllm.forward_context import set_forward_context
        from vllm.v1.outputs import ModelRunnerOutput
        from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

        self.tokens.update(tokens)
        for new in output.scheduled_new_reqs:
            self.blocks[new.req_id] = list(new.block_ids[0])
        cached = output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self.blocks[req_id] = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                self.blocks[req_id].extend(new_blocks[0])
        starts = {new.req_id: new.num_computed_tokens for new in output.scheduled_new_reqs}
        starts.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        kv_transfer_state._KV_CONNECTOR_AGENT = self.connector
        self.connector.handle_preemptions(output.kv_connector_metadata)
        with (
            set_forward_context(None, self.vllm_config),
            KVConnectorModelRunnerMixin.maybe_get_kv_connector_output(output) as kv_output,
        ):
            for req_id, start in starts.items():
                end = start + output.num_scheduled_tokens[req_id]
                ids = self.tokens[req_id][:end]
                self.io.compute(
                    list(self.layers.values()), ids, self.slots(req_id, end), start, self.rank
                )
        req_ids = list(output.num_scheduled_tokens)
        done = {
            r for r in req_ids if starts[r] + output.num_scheduled_tokens[r] >= len(self.tokens[r])
        }
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[[7] if r in done else [] for r in req_ids],
            kv_connector_output=kv_output,
        )

    def check(self, req_id: str, tokens: list[int]) -> str | None:
        return self.io.wrong(
            list(self.layers.values()), tokens, self.slots(req_id, len(tokens)), self.rank
        )

    def wipe(self) -> None:
        """vLLM's prefix cache was reset: the paged KV is gone on this rank."""
        for paged in self.layers.values():
            paged.fill_(-1)

    def fill_pool(self, num_tokens: int) -> None:
        """Store other KV on this rank only, as if it had served other traffic: its LRU evicts
        what the other rank still holds."""
        engine = self.worker.engine
        ids = list(range(50_000, 50_000 + num_tokens))
        engine.store(ids, torch.zeros(engine.spec.shape(num_tokens), dtype=engine.spec.dtype))

    def held(self, digests: list[str]) -> int:
        """How many of these chunks (by digest), from the first, this rank holds in CPU."""
        engine = self.worker.engine
        return engine.storage.cpu_prefix([engine.scheme.key(d) for d in digests])

    def metric(self, name: str) -> float:
        return float(self.worker.engine.metrics.value(name))

    def leaks(self) -> str | None:
        worker = self.worker
        worker.poll()
        storage = worker.engine.storage
        if len(worker.pins):
            return f"{len(worker.pins)} chunks still pinned"
        if storage.pool.free_slots + len(storage.cpu) != storage.pool.num_slots:
            return "pool slots held outside the cache"
        return None

    def close(self) -> None:
        self.connector._lmcache_engine.shutdown()  # type: ignore[attr-defined]
