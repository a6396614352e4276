"""CachingProcessor: fills the response cache (``producer/cache.py``) from the pipeline.

At a generation's ``end`` (reason ``stop`` or ``length``) with a note left by the worker's
lookup, :meth:`ResponseCache.fill` reads the answer back and keeps it if complete.
"""

from __future__ import annotations

import logging

from tokenbridge.producer.cache import ResponseCache, request_digest
from tokenbridge.wire.pipeline import PipelineBatch

__all__ = ["CachingProcessor", "ResponseCache", "request_digest"]

log = logging.getLogger(__name__)


class CachingProcessor:
    """Fills the response cache from the pipeline: each complete answer, at its ``end``."""

    name = "cache"

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache
        self.filled = 0

    def __repr__(self) -> str:
        return f"<CachingProcessor filled={self.filled} {self.cache!r}>"

    async def process(self, batch: PipelineBatch, entry_id: str) -> None:
        """Fill the cache if ``batch`` ends a cacheable generation (idempotent)."""
        if batch.terminal is None:
            return
        if await self.cache.fill(batch.session_id, batch.generation_id):
            self.filled += 1
            log.debug("answer cached generation=%s", batch.generation_id)
