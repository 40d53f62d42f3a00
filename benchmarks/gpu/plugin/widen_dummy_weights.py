"""vLLM plugin of the serving benchmark: dummy weights whose greedy output depends on the context.

``--load-format dummy`` draws every weight from U(-1e-3, 1e-3). Attention is then uniform and the
next token is the same whatever the prompt, so "warm output == cold output" would hold even for
KV loaded from the wrong place. This plugin (entry point ``vllm.general_plugins``, loaded by
vLLM in every process; this folder is on the servers' ``PYTHONPATH``) replaces that draw with a
fan-in-scaled one: vectors (norm weights) are 1, a matrix is U(+-gain * sqrt(3 / fan_in)), i.e.
standard deviation gain / sqrt(fan_in). With gain 2 (``BENCH_DUMMY_WEIGHT_GAIN``) a 4-layer
Llama-8B-wide model already changes its greedy output when only the first 256 of 2048 tokens
change, while staying finite in bf16. As with vLLM's draw, a tensor's values depend only on its
shape and a fixed seed, so every server of a run holds the same weights.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

GAIN_ENV = "BENCH_DUMMY_WEIGHT_GAIN"
SEED = 1234


@torch.no_grad()
def widened_init(model: torch.nn.Module, *_: Any, **__: Any) -> None:
    """Replacement of vLLM's ``initialize_dummy_weights(model, model_config, ...)``."""
    gain = float(os.environ.get(GAIN_ENV, "2.0"))
    for param in model.state_dict().values():
        if param.device.type == "meta" or not torch.is_floating_point(param):
            continue
        if param.dim() < 2:
            param.fill_(1.0)
            continue
        bound = gain * math.sqrt(3.0 / param.shape[-1])
        generator = torch.Generator(device=param.device).manual_seed(SEED)
        param.uniform_(-bound, bound, generator=generator)


def register() -> None:
    """vLLM's general-plugin hook: swap the dummy loader's weight init (idempotent)."""
    from vllm.model_executor.model_loader import dummy_loader

    dummy_loader.initialize_dummy_weights = widened_init
