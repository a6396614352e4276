"""Redis clients: one bounded pool for commands, dedicated connections for blocking reads.

Standalone Redis or Redis Cluster: a URL ``redis+cluster://host:port`` (``rediss+cluster://``
with TLS), or ``cluster=True`` beside a plain URL, makes :func:`command_client` return redis-py's
asyncio :class:`RedisCluster`; the seed node is enough, the rest is discovered. Either client
routes a command by its first key; :func:`node_connection` gives the hot paths a raw
connection to the node that serves a key, for hand-packed commands.

Blocking reads (``XREAD``/``XREADGROUP BLOCK``) hold their connection for up to ``BLOCK`` ms, so
each loop gets its own single-connection client with a socket timeout longer than its block
(redis-py issues #2807, #3138: otherwise a long ``BLOCK`` surfaces as ``TimeoutError``). The
number of such loops is fixed by settings, so the number of connections per process is bounded
whatever the number of clients. Redis error prefixes are matched here, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

from redis import exceptions as redis_exc
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff, ExponentialWithJitterBackoff

__all__ = [
    "REDIS_DOWN_ERRORS",
    "AnyRedis",
    "Backoff",
    "blocking_client",
    "blocking_pool",
    "close_client",
    "cluster_url",
    "command_client",
    "is_busygroup",
    "is_cluster",
    "is_moved",
    "is_nogroup",
    "is_noscript",
    "node_connection",
]

REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
    redis_exc.BusyLoadingError,
    ConnectionError,
    OSError,
    # A cluster whose topology is changing (a failover, a reshard): retried the same way.
    redis_exc.ClusterDownError,
    redis_exc.TryAgainError,
    redis_exc.AskError,  # and MovedError: redis-py followed redirections until it gave up
    redis_exc.ReadOnlyError,  # a primary just turned replica
    redis_exc.RedisClusterException,  # e.g. no node reachable while the slot map reloads
)
"""Errors that mean "Redis is not reachable right now": loops back off and retry on these."""


def is_busygroup(exc: BaseException) -> bool:
    """``XGROUP CREATE`` on a group that exists (redis-py raises a plain ResponseError)."""
    return isinstance(exc, redis_exc.ResponseError) and str(exc).startswith("BUSYGROUP")


def is_nogroup(exc: BaseException) -> bool:
    """The group (or its stream) does not exist, e.g. after Redis restarted without data."""
    return isinstance(exc, redis_exc.ResponseError) and str(exc).startswith("NOGROUP")


AnyRedis: TypeAlias = Redis | RedisCluster
"""A command client: standalone (``Redis``) or cluster (``RedisCluster``)."""

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_url(url: str, cluster: bool = False) -> tuple[str, bool]:
    """``(plain url, is a cluster)``: ``redis+cluster://`` and ``rediss+cluster://`` name a
    cluster (as does ``cluster=True``, i.e. ``TOKENBRIDGE_REDIS_CLUSTER``)."""
    scheme, sep, rest = url.partition("://")
    plain = _CLUSTER_SCHEMES.get(scheme.lower())
    if sep and plain is not None:
        return f"{plain}://{rest}", True
    return url, cluster


def is_cluster(redis: Any) -> bool:
    return isinstance(redis, RedisCluster)


async def close_client(redis: Any) -> None:
    """Close a client from :func:`command_client` and its connections (either kind)."""
    await redis.aclose()
    if not is_cluster(redis):  # a cluster client closes its node pools itself
        await redis.connection_pool.disconnect()


def is_moved(exc: BaseException) -> bool:
    """A slot answered by another node (``MOVED``/``ASK``): the topology changed."""
    if isinstance(exc, redis_exc.AskError):  # MovedError is one too
        return True
    return isinstance(exc, redis_exc.ResponseError) and str(exc).startswith(("MOVED", "ASK"))


def is_noscript(exc: BaseException) -> bool:
    """``EVALSHA`` of a script this node does not have (restarted, promoted replica)."""
    return isinstance(exc, redis_exc.NoScriptError) or (
        isinstance(exc, redis_exc.ResponseError) and str(exc).startswith("NOSCRIPT")
    )


def command_client(
    url: str,
    max_connections: int,
    socket_timeout_s: float,
    client_name: str | None = None,
    cluster: bool = False,
) -> Any:
    """A client whose callers wait for a connection, never open more than ``max_connections``
    (per node on a cluster). Typed ``Any`` for the callers written against ``Redis``: both
    clients share the command API; cluster-only code checks :func:`is_cluster`."""
    url, cluster = cluster_url(url, cluster)
    if cluster:
        return _cluster_client(url, max_connections, socket_timeout_s, client_name)
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


class _BoundedCluster(RedisCluster):
    """RedisCluster whose callers wait for a free connection instead of failing.

    redis-py's cluster node pools raise ``MaxConnectionsError`` when full; the standalone
    client waits (``BlockingConnectionPool``). A semaphore of the same size in front of every
    command gives the cluster client the same behaviour.
    """

    def __init__(self, *args: Any, command_slots: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = asyncio.Semaphore(command_slots)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._slots:
            try:
                return await super().execute_command(*args, **kwargs)
            except redis_exc.ResponseError as exc:
                if str(exc).startswith("UNBLOCKED"):
                    # A blocking read on a primary that just became a replica (failover):
                    # "Redis is not reachable right now" for the loops (MOVED then reloads
                    # the slot map).
                    raise redis_exc.ConnectionError(str(exc)) from exc
                raise


def _cluster_client(
    url: str, max_connections: int, socket_timeout_s: float, client_name: str | None
) -> RedisCluster:
    kwargs: dict[str, Any] = dict(parse_url(url))
    if kwargs.pop("connection_class", None) is not None:  # rediss:// -> SSLConnection
        kwargs["ssl"] = True
    kwargs.pop("db", None)
    return _BoundedCluster(
        **kwargs,
        command_slots=max_connections,
        client_name=client_name,
        max_connections=max_connections,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        protocol=2,
    )


@asynccontextmanager
async def node_connection(
    redis: Any, key: bytes, address: tuple[str, int] | None = None
) -> AsyncIterator[AbstractConnection]:
    """A raw connection to the node that serves ``key`` (standalone: the pool's; on a
    cluster, the node at ``address`` if given: an ``ASK``), for hand-packed commands;
    disconnected if anything fails, so no half-read reply leaks."""
    if not is_cluster(redis):
        pool = redis.connection_pool
        conn = await pool.get_connection()
        try:
            yield conn
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        return
    cluster: _BoundedCluster = redis
    async with cluster._slots:
        await cluster.initialize()  # once; a no-op afterwards
        if address is not None:
            node = cluster.get_node(host=address[0], port=address[1])
            if node is None:
                await cluster.nodes_manager.initialize()
                node = cluster.get_node(host=address[0], port=address[1])
        else:
            node = cluster.get_node_from_key(key.decode())
        if node is None:
            raise redis_exc.ClusterDownError(f"no node serves the slot of {key!r}")
        cconn = node.acquire_connection()
        try:
            if not cconn.is_connected:
                await cconn.connect()  # type: ignore[no-untyped-call]
            yield cconn
        except BaseException:
            await cconn.disconnect()
            raise
        finally:
            node.release(cconn)


def blocking_client(url: str, block_ms: int, **kwargs: Any) -> Any:
    """A single-connection client for one blocking-read loop, socket timeout > its BLOCK.

    On a cluster, a cluster client whose node pools hold the loop's connections."""
    timeout_s = block_ms / 1000 + 10
    url, cluster = cluster_url(url, bool(kwargs.pop("cluster", False)))
    if cluster:
        return _cluster_client(url, 2, timeout_s, kwargs.get("client_name"))
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
