"""Presence: every process (gateway, worker, processor) says in Redis who it is and what it did.

Each :class:`Runtime` publishes, every ``presence_heartbeat_s``, one JSON record: its roles,
host and pid, start time, last heartbeat, whether it drains, and the counters of its parts
(connections by transport, fan-out sessions, slow-client cuts, generations run, cache hits,
rate-limit refusals, ...). The record is a plain string key with a TTL of three heartbeats
(``<prefix>:proc:<node_id>``), indexed by a sorted set (``<prefix>:procs``, node id -> last
heartbeat): a process that dies without a word disappears when its key expires.

Readers (:func:`list_processes`) read the index with a bound, then each record with its own
``GET``: no ``KEYS``/``SCAN``, and no command spans two keys, so it works on Redis Cluster
(the records live on any slot). A process that stops cleanly deletes its record at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from redis.asyncio import Redis

from tokenbridge.store.client import REDIS_DOWN_ERRORS
from tokenbridge.store.series import TTL_MS as SERIES_TTL_MS
from tokenbridge.store.series import bucket_of
from tokenbridge.wire.events import now_ms
from tokenbridge.wire.keys import Keys

if TYPE_CHECKING:
    from tokenbridge.gateway.state import Gateway

__all__ = ["MAX_PROCESSES", "Presence", "add_gateway", "list_processes", "presence_of"]

log = logging.getLogger(__name__)

MAX_PROCESSES = 500
"""Most processes a reader lists (the newest heartbeats first)."""

_FORGET_AFTER_MS = 86_400_000  # index entries older than a day are dropped by readers


class Presence:
    """Publishes this process's record until stopped; ``sources`` add counters to it.

    ``sources`` maps a name to a function returning a JSON-able value, called at every
    heartbeat (``{"connections": manager.stats, ...}``); one that raises is skipped, logged
    at DEBUG. ``draining`` tells the record whether the process is shutting down.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        node_id: str,
        roles: list[str],
        heartbeat_s: float = 5.0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.node_id = node_id
        self.roles = roles
        self.heartbeat_s = heartbeat_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started_ms = now_ms()
        self.sources: dict[str, Callable[[], Any]] = {}
        self.draining: Callable[[], bool] = lambda: False
        # A worker's running generations, also written to the analytics time bucket.
        self.running: Callable[[], int] | None = None
        self.published = 0
        self._stop = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Presence {self.node_id} roles={','.join(self.roles)} published={self.published}>"

    def record(self) -> dict[str, Any]:
        """What this process publishes now."""
        counters: dict[str, Any] = {}
        for name, source in self.sources.items():
            try:
                counters[name] = source()
            except Exception as exc:  # one broken source must not hide the process
                log.debug("presence source failed name=%s error=%s", name, exc)
        return {
            "node_id": self.node_id,
            "roles": self.roles,
            "host": self.host,
            "pid": self.pid,
            "started_ms": self.started_ms,
            "heartbeat_ms": now_ms(),
            "heartbeat_s": self.heartbeat_s,
            "draining": bool(self.draining()),
            "counters": counters,
        }

    async def publish(self) -> None:
        """Write the record (TTL three heartbeats) and its index entry."""
        record = self.record()
        ttl_ms = max(1000, int(self.heartbeat_s * 3000))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.process(self.node_id), json.dumps(record), px=ttl_ms)
            pipe.zadd(self.keys.processes, {self.node_id: record["heartbeat_ms"]})
            if self.running is not None:
                series = self.keys.stats_series(bucket_of(record["heartbeat_ms"]))
                pipe.hset(series, f"run:{self.node_id}", self.running())
                pipe.pexpire(series, SERIES_TTL_MS)
            await pipe.execute()
        self.published += 1

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Publish every ``heartbeat_s`` until stopped, then remove the record."""
        try:
            while not self._stop.is_set():
                try:
                    await self.publish()
                except REDIS_DOWN_ERRORS as exc:
                    log.debug("presence not published (%s)", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.heartbeat_s)
        finally:
            await self._leave()

    async def _leave(self) -> None:
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            await self.redis.delete(self.keys.process(self.node_id))
            await self.redis.zrem(self.keys.processes, self.node_id)


async def list_processes(
    redis: Redis, keys: Keys, limit: int = MAX_PROCESSES
) -> list[dict[str, Any]]:
    """The live processes' records, newest heartbeat first (at most ``limit``).

    Index entries whose record expired (the process died) are removed on the way.
    """
    now = now_ms()
    await redis.zremrangebyscore(keys.processes, "-inf", now - _FORGET_AFTER_MS)
    ids: Any = await redis.zrevrange(keys.processes, 0, limit - 1)
    names = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
    if not names:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.get(keys.process(name))
        raws = await pipe.execute()
    out: list[dict[str, Any]] = []
    gone: list[str] = []
    for name, raw in zip(names, raws, strict=True):
        if raw is None:
            gone.append(name)
            continue
        with contextlib.suppress(ValueError, TypeError):
            out.append(json.loads(raw))
    if gone:
        await redis.zrem(keys.processes, *gone)
    out.sort(key=lambda r: (str(r.get("host", "")), int(r.get("pid", 0)), str(r["node_id"])))
    return out


class _Process(Protocol):
    """What :func:`presence_of` reads of a Runtime (a protocol: the runtime imports us)."""

    redis: Redis
    keys: Keys
    node_id: str
    settings: Any
    worker: Any
    processor: Any
    consumers: Any
    cache: Any


def presence_of(runtime: _Process) -> Presence:
    """The presence of a Runtime's process, with the counters of the parts it runs (a
    gateway adds its own with :func:`add_gateway`)."""
    roles = [
        role
        for role, part in (("worker", runtime.worker), ("processor", runtime.processor))
        if part is not None
    ]
    presence = Presence(
        runtime.redis,
        runtime.keys,
        runtime.node_id,
        roles,
        runtime.settings.presence_heartbeat_s,
    )
    worker, processor = runtime.worker, runtime.processor
    if worker is not None:
        presence.running = lambda: worker.consumer.inflight if worker.consumer is not None else 0
        presence.sources["worker"] = lambda: {
            "name": worker.name,
            "generations_done": worker.generations_done,
            "cached": worker.cached,
            "running": worker.consumer.inflight if worker.consumer is not None else 0,
        }
    if processor is not None:
        presence.sources["processor"] = lambda: {"name": processor.name}
    presence.sources["consumers"] = runtime.consumers.status
    presence.sources["cache"] = lambda: {
        "hits": runtime.cache.hits,
        "misses": runtime.cache.misses,
    }
    return presence


def add_gateway(presence: Presence, gateway: Gateway) -> None:
    """A gateway's counters in its process's presence record: connections (and whether it
    drains), its fan-out readers, and the generations its admission refused."""
    connections, fanout = gateway.connections, gateway.fanout

    def stats() -> dict[str, Any]:
        body = connections.stats()
        body.pop("limits", None)
        return body

    presence.roles.insert(0, "gateway")
    presence.sources["connections"] = stats
    presence.sources["fanout"] = lambda: {
        "readers": fanout.reader_count,
        "sessions": fanout.session_count,
        **vars(fanout.stats),
    }
    presence.sources["rate_limit"] = lambda: {"refused": gateway.admission.refused}
    presence.draining = lambda: connections.draining
