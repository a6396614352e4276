"""StreamConsumerService: start, stop and report the StreamConsumers of this process.

Consumers are keyed by (stream, group, consumer) and run as tasks of the service's own
``TaskGroup`` (``async with StreamConsumerService(...)``); leaving stops them all, gives their
handlers ``drain_s`` to finish, then cancels what is left (those entries stay pending).

:meth:`status` reports this process's consumers with live figures; :meth:`group_status` reads
any stream's groups and consumers from Redis (``XINFO GROUPS``/``XINFO CONSUMERS``), so every
process can show the whole picture, not only its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any

from redis.asyncio import Redis

from tokenbridge.consumers.dead_letters import DeadLetters
from tokenbridge.consumers.stream_consumer import ConsumerOptions, Handler, StreamConsumer
from tokenbridge.store.client import REDIS_DOWN_ERRORS
from tokenbridge.tasks import stop_within
from tokenbridge.text import as_text

__all__ = ["StreamConsumerService", "group_status"]

log = logging.getLogger(__name__)

ConsumerKey = tuple[str, str, str]


class StreamConsumerService:
    """Owns the consumers of one process."""

    def __init__(
        self,
        redis: Redis,
        make_blocking_client: Callable[[], Redis],
        dead_letters: DeadLetters | None = None,
        drain_s: float = 10.0,
    ) -> None:
        self.redis = redis
        self.dead_letters = dead_letters
        self.drain_s = drain_s
        self._make_client = make_blocking_client
        self._consumers: dict[ConsumerKey, tuple[StreamConsumer, asyncio.Task[None]]] = {}
        self._group: asyncio.TaskGroup | None = None

    def __repr__(self) -> str:
        return f"<StreamConsumerService consumers={len(self._consumers)}>"

    async def __aenter__(self) -> StreamConsumerService:
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop_all()
        assert self._group is not None
        await self._group.__aexit__(exc_type, exc, tb)
        self._group = None

    def start_consumer(
        self,
        stream: str,
        group: str,
        consumer: str,
        handler: Handler,
        options: ConsumerOptions = ConsumerOptions(),  # noqa: B008  (frozen: shared safely)
    ) -> StreamConsumer:
        """Start a consumer (dead letters go to the service's stream); returns it."""
        if self._group is None:
            raise RuntimeError("StreamConsumerService is not entered (use `async with`)")
        key = (stream, group, consumer)
        if key in self._consumers:
            return self._consumers[key][0]
        instance = StreamConsumer(
            self.redis, self._make_client, stream, group, consumer, handler, options,
            self.dead_letters,
        )  # fmt: skip
        task = self._group.create_task(instance.run(), name=f"consumer:{stream}:{consumer}")
        task.add_done_callback(lambda _t, k=key: self._consumers.pop(k, None))  # type: ignore[misc]
        self._consumers[key] = (instance, task)
        return instance

    async def stop_consumer(self, stream: str, group: str, consumer: str) -> bool:
        """Stop one consumer, waiting up to ``drain_s`` for its handlers; False if unknown."""
        entry = self._consumers.get((stream, group, consumer))
        if entry is None:
            return False
        await self._stop([entry])
        return True

    async def wait_consumer(self, stream: str, group: str, consumer: str) -> None:
        """Wait until that consumer's run returns (in burst mode: nothing left to read)."""
        entry = self._consumers.get((stream, group, consumer))
        if entry is not None:
            await asyncio.wait({entry[1]})

    async def stop_all(self) -> None:
        await self._stop(list(self._consumers.values()))

    async def _stop(self, entries: list[tuple[StreamConsumer, asyncio.Task[None]]]) -> None:
        for instance, _ in entries:
            instance.stop()
        late = await stop_within([task for _, task in entries], self.drain_s)
        for task in late:
            log.warning("consumer did not drain in %.1fs; cancelled %s", self.drain_s, task)

    def consumers(self) -> list[StreamConsumer]:
        return [instance for instance, _ in self._consumers.values()]

    def status(self) -> list[dict[str, Any]]:
        """This process's consumers with their live figures."""
        return [
            {
                "stream": c.stream,
                "group": c.group,
                "consumer": c.consumer,
                "running": c.running,
                "inflight": c.inflight,
                **vars(c.stats),
            }
            for c in self.consumers()
        ]

    async def group_status(self, stream: str) -> list[dict[str, Any]]:
        """Every group of ``stream`` with its consumers, as Redis sees them (all processes)."""
        return await group_status(self.redis, stream)


async def group_status(redis: Redis, stream: str) -> list[dict[str, Any]]:
    """Every group of ``stream`` with its consumers, from XINFO GROUPS / XINFO CONSUMERS."""
    try:
        groups: Any = await redis.xinfo_groups(stream)
    except REDIS_DOWN_ERRORS:
        raise
    except Exception:  # no such stream yet
        return []
    out = []
    for g in groups:
        name = as_text(g["name"])
        consumers: Any = await redis.xinfo_consumers(stream, name)
        out.append(
            {
                "stream": stream,
                "group": name,
                "pending": int(g["pending"]),
                "lag": g.get("lag"),
                "last_delivered_id": as_text(g["last-delivered-id"]),
                "consumers": [
                    {
                        "name": as_text(c["name"]),
                        "pending": int(c["pending"]),
                        "idle_ms": int(c["idle"]),
                    }
                    for c in consumers
                ],
            }
        )
    return out
