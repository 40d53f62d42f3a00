"""The class vLLM's built-in ``LMCacheConnectorV1`` loads: ``LMCacheConnectorV1Impl``.

vLLM constructs it as ``cls(vllm_config, role, parent)`` in the scheduler and in every worker
and forwards its connector calls to it; scheduler calls go to :class:`SchedulerConnector`,
worker calls to :class:`WorkerConnector`. ``parent`` holds the metadata vLLM binds per step.
"""

from __future__ import annotations

import atexit
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_events import BlockStored, KVCacheEvent
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from lmcache.integration.vllm.metadata import LMCacheConnectorMetadata
from lmcache.integration.vllm.scheduler import SchedulerConnector
from lmcache.integration.vllm.stats import TransferStats
from lmcache.integration.vllm.worker import WorkerConnector

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request


class LMCacheConnectorV1Impl:
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, parent: KVConnectorBase_V1
    ) -> None:
        self._parent = parent
        self._scheduler: SchedulerConnector | None = None
        self._worker: WorkerConnector | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerConnector(vllm_config)
        else:
            self._worker = WorkerConnector(vllm_config)
            _forward_preemptions(parent, self)
        atexit.register(self.shutdown)

    @property
    def scheduler(self) -> SchedulerConnector:
        if self._scheduler is None:
            raise RuntimeError("scheduler-side call on a worker-side LMCache connector")
        return self._scheduler

    @property
    def worker(self) -> WorkerConnector:
        if self._worker is None:
            raise RuntimeError("worker-side call on a scheduler-side LMCache connector")
        return self._worker

    def _metadata(self) -> LMCacheConnectorMetadata:
        meta = self._parent._get_connector_metadata()
        if not isinstance(meta, LMCacheConnectorMetadata):
            raise TypeError(f"expected LMCacheConnectorMetadata, got {type(meta).__name__}")
        return meta

    # -- scheduler side ----------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int | None:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> LMCacheConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    # -- worker side -------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, metadata: KVConnectorMetadata) -> None:
        """vLLM >= 0.33 hands the step's metadata here first (its wrapper keeps a copy) and
        calls ``start_load_kv`` after the forward in steps without loads: landed stores are
        published and finished loads unpinned here, before the step, as ``start_load`` does
        on 0.25."""
        self.worker.poll()

    def handle_preemptions(self, metadata: KVConnectorMetadata) -> None:
        if isinstance(metadata, LMCacheConnectorMetadata):
            self.worker.handle_preemptions(metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self.worker.start_load(self._metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        """Stores happen once per step in :meth:`wait_for_save`, for all layers at once."""

    def wait_for_save(self) -> None:
        self.worker.wait_for_save(self._metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Finished requests whose stores have landed (their blocks may be freed now)."""
        return self.worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors()

    def get_kv_events(self) -> list[Any]:
        """The KV events of this step, for vLLM's built-in wrapper: it turns each into a
        ``BlockStored`` and cannot carry removals, so only stores are given to it (our own
        connector class, by module path, publishes both)."""
        return [e for e in self.worker.take_events() if isinstance(e, BlockStored)]

    def take_stats(self) -> TransferStats | None:
        """Transfer statistics of this worker since the last call; vLLM also asks the
        scheduler side, which has none."""
        return self._worker.take_stats() if self._worker is not None else None

    def take_kv_events(self) -> list[KVCacheEvent]:
        """Every KV event of this step (stores and removals)."""
        return self.worker.take_events()

    def shutdown(self) -> None:
        atexit.unregister(self.shutdown)
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()


def _forward_preemptions(parent: KVConnectorBase_V1, impl: LMCacheConnectorV1Impl) -> None:
    """vLLM's model runner calls ``handle_preemptions`` on the connector before it zeroes and
    reuses a preempted request's blocks, but its built-in LMCache wrapper (0.25 to 0.33) does
    not forward it, and asynchronous stores need it. Give the wrapper instance the forward it
    lacks (a wrapper that forwards it itself is left alone)."""
    if type(parent).handle_preemptions is KVConnectorBase_V1.handle_preemptions:
        parent.handle_preemptions = impl.handle_preemptions  # type: ignore[method-assign,assignment]
