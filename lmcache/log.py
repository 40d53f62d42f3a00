"""The ``lmcache`` logger and the seed's two per-request lines.

Operators grep for these exact lines (``LMCache hit tokens``, ``Storing KV cache for``), so they
live in one place and keep the seed's wording.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("lmcache")


def setup_logging() -> None:
    """Give the ``lmcache`` logger the seed's ``LMCache INFO:`` prefix unless the host app
    (e.g. vLLM) already configured it."""
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("LMCache %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("LMCACHE_LOG_LEVEL", "INFO").upper())
    logger.propagate = False


def log_lookup(request_id: str, total_tokens: int, hit_tokens: int, need_to_load: int) -> None:
    logger.info(
        "Reqid: %s, Total tokens %d, LMCache hit tokens: %d, need to load: %d",
        request_id,
        total_tokens,
        hit_tokens,
        need_to_load,
    )


def log_store(request_id: str, stored_tokens: int, total_tokens: int) -> None:
    logger.info(
        "Storing KV cache for %d out of %d tokens for request %s",
        stored_tokens,
        total_tokens,
        request_id,
    )
