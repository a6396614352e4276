"""Admission: the checks a new generation must pass before it is queued.

Each check is called with (identity, model name) and raises
:class:`~tokenbridge.exceptions.LimitExceeded` (HTTP 429 with ``Retry-After``) to refuse. The
configured rate limits (``rate_limits.py``) are the built-in one; an embedding application
may append its own to :attr:`Admission.checks`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from tokenbridge.exceptions import LimitExceeded
from tokenbridge.rate_limits import RateLimiter
from tokenbridge.settings import Settings
from tokenbridge.wire.keys import Keys

__all__ = ["Admission", "AdmissionCheck"]

AdmissionCheck = Callable[[str, str], Awaitable[None]]


class Admission:
    """Runs every admission check in order; the first refusal wins."""

    def __init__(self, checks: list[AdmissionCheck] | None = None) -> None:
        self.checks: list[AdmissionCheck] = checks or []
        self.refused = 0  # requests refused here (the dashboard shows the sum over processes)

    @classmethod
    def from_settings(cls, redis: Redis, keys: Keys, settings: Settings) -> Admission:
        """The configured rate limits (none when no limit is set)."""
        limiter = RateLimiter(redis, keys, settings)
        return cls([limiter.admit] if limiter.enabled else [])

    def __repr__(self) -> str:
        return f"<Admission checks={len(self.checks)}>"

    async def __call__(self, identity: str, model: str) -> None:
        try:
            for check in self.checks:
                await check(identity, model)
        except LimitExceeded:
            self.refused += 1
            raise
