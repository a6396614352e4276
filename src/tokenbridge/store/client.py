"""Redis clients: one bounded pool for commands, dedicated connections for blocking reads.

Blocking reads (``XREAD``/``XREADGROUP BLOCK``) hold their connection for up to ``BLOCK`` ms, so
each loop gets its own single-connection client with a socket timeout longer than its block
(redis-py issues #2807, #3138: otherwise a long ``BLOCK`` surfaces as ``TimeoutError``). The
number of such loops is fixed by settings, so the number of connections per process is bounded
whatever the number of clients. Redis error prefixes are matched here, once.
"""

from __future__ import annotations

from typing import Any

from redis import exceptions as redis_exc
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.backoff import EqualJitterBackoff, ExponentialWithJitterBackoff
from redis.retry import Retry

__all__ = [
    "REDIS_DOWN_ERRORS",
    "Backoff",
    "blocking_client",
    "blocking_pool",
    "command_client",
    "is_busygroup",
    "is_nogroup",
]

REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
    redis_exc.BusyLoadingError,
    ConnectionError,
    OSError,
)
"""Errors that mean "Redis is not reachable right now": loops back off and retry on these."""


def is_busygroup(exc: BaseException) -> bool:
    """``XGROUP CREATE`` on a group that exists (redis-py raises a plain ResponseError)."""
    return isinstance(exc, redis_exc.ResponseError) and str(exc).startswith("BUSYGROUP")


def is_nogroup(exc: BaseException) -> bool:
    """The group (or its stream) does not exist, e.g. after Redis restarted without data."""
    return isinstance(exc, redis_exc.ResponseError) and str(exc).startswith("NOGROUP")


def command_client(
    url: str, max_connections: int, socket_timeout_s: float, client_name: str | None = None
) -> Redis:
    """A client over a BlockingConnectionPool: callers wait for a connection, never open more."""
    pool: BlockingConnectionPool = BlockingConnectionPool.from_url(
        url,
        client_name=client_name,
        max_connections=max_connections,
        timeout=socket_timeout_s,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        health_check_interval=30,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=2),
        retry_on_error=[redis_exc.ConnectionError],
    )
    return Redis(connection_pool=pool)


def blocking_client(url: str, block_ms: int, **kwargs: Any) -> Redis:
    """A single-connection client for one blocking-read loop, socket timeout > its BLOCK."""
    timeout_s = block_ms / 1000 + 10
    return Redis.from_url(
        url,
        single_connection_client=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=10,
        **kwargs,
    )


def blocking_pool(url: str, block_ms: int, client_name: str | None = None) -> ConnectionPool:
    """A pool from which one blocking-read loop takes its one connection, timeout > BLOCK."""
    timeout_s = block_ms / 1000 + 10
    pool: ConnectionPool = ConnectionPool.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=10,
        client_name=client_name,
        max_connections=1,
    )
    return pool


class Backoff:
    """Reconnect-loop delays: redis-py's equal-jitter backoff (the curve its own ``Retry``
    uses), counting failures: ``await asyncio.sleep(b.next())``, ``b.reset()`` on success."""

    __slots__ = ("_curve", "failures")

    def __init__(self, base_s: float = 0.05, cap_s: float = 2.0) -> None:
        self._curve = EqualJitterBackoff(cap=cap_s, base=base_s)
        self.failures = 0

    def next(self) -> float:
        delay = self._curve.compute(self.failures)
        self.failures = min(self.failures + 1, 30)
        return delay

    def reset(self) -> None:
        self.failures = 0
