"""RateLimitProcessor: charges the token budgets of ``rate_limits.py`` as the pipeline sees tokens.

The limits themselves (scopes, admission, the charge script) are in
:mod:`tokenbridge.rate_limits`: the gateway admits with them, the worker notes who pays
(:meth:`RateLimiter.track`), and this processor charges each pipeline entry's tokens once.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

from tokenbridge.rate_limits import Rate, RateLimiter, parse_rate
from tokenbridge.wire.events import Event
from tokenbridge.wire.pipeline import PipelineBatch

__all__ = ["Rate", "RateLimitProcessor", "RateLimiter", "batch_tokens", "parse_rate"]

log = logging.getLogger(__name__)

_KNOWN_GENERATIONS = 4096  # generation -> identity remembered by one processor (bounded LRU)


def batch_tokens(events: Sequence[Event]) -> int:
    """Tokens one batch uses: one per ``token`` event; at ``end``, the prompt's tokens and
    any completion tokens the provider counted beyond the token events."""
    tokens = 0
    for event in events:
        if event.kind == "token":
            tokens += 1
        elif event.kind == "end" and event.usage is not None:
            tokens += event.usage.get("prompt_tokens", 0)
            tokens += max(0, event.usage.get("completion_tokens", 0) - event.tokens)
    return tokens


class RateLimitProcessor:
    """Charges the tokens each pipeline batch carries to its generation's token budgets."""

    name = "rate_limit"

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self.charged = 0
        self._identities: OrderedDict[str, str | None] = OrderedDict()  # generation -> who

    def __repr__(self) -> str:
        return f"<RateLimitProcessor charged={self.charged} {self.limiter!r}>"

    async def process(self, batch: PipelineBatch, entry_id: str) -> None:
        """Charge ``batch`` once (keyed on ``batch.once_key``: a redelivered or replayed entry
        is not charged again)."""
        if not self.limiter.token_scopes:
            return
        gid = batch.generation_id
        if gid in self._identities:
            self._identities.move_to_end(gid)
            identity = self._identities[gid]
        else:
            identity = self._identities[gid] = await self.limiter.identity_of(gid)
            if len(self._identities) > _KNOWN_GENERATIONS:
                self._identities.popitem(last=False)
        tokens = batch_tokens(batch.events)
        if identity is not None and await self.limiter.charge(
            batch.once_key, identity, batch.model, tokens
        ):
            self.charged += tokens
        if batch.terminal is not None:
            self._identities.pop(gid, None)
