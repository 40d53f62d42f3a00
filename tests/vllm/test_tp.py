"""Tensor parallelism with two CPU processes standing in for two TP ranks (no machine with two
GPUs is lent here): vLLM's own distributed groups (gloo), the real scheduler asking both
ranks, each rank's own engine, pool and shard of KV, vLLM's output aggregator.

A chunk one rank evicted while the other still holds it is never promised, so under vLLM's
default ``kv_load_failure_policy: fail`` no request fails, and each rank loads its own shard.
"""

from __future__ import annotations

import multiprocessing
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.v1.engine import FinishReason
from vllm.v1.request import Request

from lmcache.keys import chunk_digests
from lmcache.storage.remote.devserver import free_port
from tests.vllm import tp_rank
from tests.vllm.conftest import CHUNK, Rig, make_scheduler, make_vllm_config
from tests.vllm.test_scheduler import lookup_line, prompt

NUM_BLOCKS = 256


class Ranks:
    """The rank processes, spoken to over pipes."""

    def __init__(self, model_dir: Path, engine_id: str, extra: dict[str, Any]) -> None:
        context = multiprocessing.get_context("spawn")
        port = free_port()
        self.pipes: list[Connection] = []
        self.processes = []
        for rank in range(2):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=tp_rank.serve,
                args=(rank, port, model_dir, engine_id, extra, theirs),
                daemon=True,
            )
            process.start()
            self.pipes.append(ours)
            self.processes.append(process)
        for pipe in self.pipes:
            self._answer(pipe, timeout=300)

    @staticmethod
    def _answer(pipe: Connection, timeout: float = 120) -> Any:
        assert pipe.poll(timeout), "a rank did not answer"
        ok, result = pipe.recv()
        assert ok, result
        return result

    def all(self, command: str, *args: Any) -> list[Any]:
        for pipe in self.pipes:
            pipe.send((command, args))
        return [self._answer(pipe) for pipe in self.pipes]

    def one(self, rank: int, command: str, *args: Any) -> Any:
        self.pipes[rank].send((command, args))
        return self._answer(self.pipes[rank])

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(("close", ()))
        for process in self.processes:
            process.join(60)
            if process.is_alive():
                process.kill()


def test_a_chunk_one_rank_evicted_is_not_promised(model_dir: Path, lmcache_log: list[str]) -> None:
    engine_id = str(uuid.uuid4())
    extra = {"lmcache.max_local_cpu_size": 12 * CHUNK * 256 / (1 << 30)}  # 12 chunks a rank
    ranks = Ranks(model_dir, engine_id, extra)
    try:
        vllm_config = make_vllm_config(
            model_dir, extra, tensor_parallel_size=2, engine_id=engine_id
        )
        scheduler = make_scheduler(vllm_config, NUM_BLOCKS)
        aggregator = KVOutputAggregator(expected_finished_count=2)
        finished: dict[str, FinishReason] = {}
        prompts: dict[str, list[int]] = {}

        def run(req_id: str, tokens: list[int]) -> None:
            prompts[req_id] = tokens
            request: Request = Rig.make_request(req_id, tokens)
            scheduler.add_request(request)
            while scheduler.has_requests():
                output = scheduler.schedule()
                outputs = ranks.all("step", output, prompts)
                for outs in scheduler.update_from_output(
                    output, aggregator.aggregate(outputs)
                ).values():
                    for out in outs.outputs:
                        if out.finish_reason is not None:
                            finished[out.request_id] = out.finish_reason

        tokens = prompt(5 * CHUNK)  # 5 chunks on each rank
        run("r1", tokens)
        digests = [c.key for c in chunk_digests(tokens, CHUNK, include_partial=True)]
        assert ranks.all("held", digests) == [5, 5]
        assert ranks.all("metric", "lmcache:num_stored_tokens_total") == [5 * CHUNK, 5 * CHUNK]

        ranks.one(1, "fill_pool", 9 * CHUNK)  # rank 1 serves other traffic: evicts 2 chunks
        assert ranks.all("held", digests) == [5, 3]
        assert scheduler.reset_prefix_cache()
        ranks.all("wipe")

        run("r2", tokens)
        assert lookup_line("r2", 5 * CHUNK, 3 * CHUNK, 3 * CHUNK) in lmcache_log, (
            "promised what both ranks hold"
        )
        assert finished["r2"] != FinishReason.ERROR
        assert ranks.all("check", "r2", tokens) == [None, None], "each rank has its own shard"
        assert ranks.all("held", digests) == [5, 5], "rank 1 stored the recomputed chunks"
        assert ranks.all("leaks") == [None, None]
        scheduler.shutdown()
    finally:
        ranks.close()
