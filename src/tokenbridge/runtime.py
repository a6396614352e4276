"""Runtime: opens Redis, owns the process's long-lived loops, drains and closes.

``async with Runtime(settings) as rt:`` connects (a clear :class:`RedisUnavailable` if it
cannot), starts the fan-out readers and, if asked, a generation worker and the processor
pipeline (``StreamProcessor``), all in one ``TaskGroup``. Leaving stops the loops, gives
running generations ``drain_s`` to finish, cancels what is left (cancelled generations get
their ``end`` event), then closes clients.
Start: Redis, loops; stop: the reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from functools import partial
from types import TracebackType

from redis.asyncio import Redis

from tokenbridge.consumers.dead_letters import DeadLetters
from tokenbridge.consumers.stream_consumer_service import StreamConsumerService
from tokenbridge.exceptions import ConfigurationError, RedisUnavailable
from tokenbridge.gateway.auth import Auth
from tokenbridge.gateway.fanout import SessionFanout
from tokenbridge.processors.cache import ResponseCache
from tokenbridge.processors.rate_limit import RateLimiter
from tokenbridge.processors.stream_processor import StreamProcessor
from tokenbridge.producer.models import build_model
from tokenbridge.producer.models.base import ChatModel
from tokenbridge.producer.producer import Producer
from tokenbridge.producer.worker import GenerationWorker
from tokenbridge.settings import Settings
from tokenbridge.store.client import (
    REDIS_DOWN_ERRORS,
    blocking_client,
    blocking_pool,
    command_client,
)
from tokenbridge.store.scripts import Scripts
from tokenbridge.wire.keys import Keys

__all__ = ["Runtime"]

log = logging.getLogger(__name__)


class Runtime:
    """The process's shared resources: Redis clients, fan-out, producer, optional worker."""

    def __init__(
        self,
        settings: Settings,
        *,
        gateway: bool = True,
        worker: bool | None = None,
        processors: bool | None = None,
        drain_s: float | None = None,
    ) -> None:
        url = settings.redis_url_value()
        if url is None:
            raise ConfigurationError(
                "TOKENBRIDGE_REDIS_URL is not set: start the embedded server first "
                "(`tokenbridge serve` does) or point it at a running Redis"
            )
        self.settings = settings
        self.url = url
        self.keys = Keys(settings.key_prefix)
        self.node_id = secrets.token_hex(6)
        # Every connection of this process carries its name: CLIENT LIST shows who is who.
        self.client_name = f"tokenbridge-{self.node_id}"
        self.redis: Redis = command_client(
            url,
            settings.redis_max_connections,
            settings.redis_socket_timeout_s,
            client_name=self.client_name,
        )
        self.scripts = Scripts(self.redis)
        self.producer = Producer(
            self.redis,
            self.scripts,
            self.keys,
            stream_max_len=settings.stream_max_len,
            retention_s=settings.stream_retention_s,
            max_generation_s=settings.stream_max_generation_s,
            max_pending=settings.producer_max_pending,
            pipeline_shards=settings.pipeline_shards if settings.pipeline_enabled else 0,
            # A backstop only: processors/pipeline_trim.py trims (and counts what it drops).
            pipeline_max_len=settings.pipeline_max_len * 2,
        )
        self.models: dict[str, ChatModel] = {
            name: build_model(name, config) for name, config in settings.models.items()
        }
        self.fanout: SessionFanout | None = None
        if gateway:
            self.fanout = SessionFanout(
                self.redis,
                self.scripts,
                self.keys,
                partial(blocking_pool, url, settings.fanout_block_ms, client_name=self.client_name),
                readers=settings.fanout_readers,
                block_ms=settings.fanout_block_ms,
                read_count=settings.fanout_read_count,
                orphan_ttl_ms=settings.stream_retention_s * 1000,
                node_id=self.node_id,
            )
        self.auth = Auth(self.redis, self.keys, settings)
        self.dead_letters = DeadLetters(self.redis, self.keys.dead_letters, settings.dlq_max_len)
        self.consumers = StreamConsumerService(
            self.redis,
            partial(blocking_client, url, settings.worker_block_ms, client_name=self.client_name),
            self.dead_letters,
            drain_s=drain_s if drain_s is not None else settings.shutdown_drain_s,
        )
        run_worker = settings.run_worker if worker is None else worker
        self.worker: GenerationWorker | None = None
        if run_worker:
            self.worker = GenerationWorker(
                self.redis,
                self.consumers,
                self.keys,
                self.producer,
                self.models,
                concurrency=settings.worker_concurrency,
                block_ms=settings.worker_block_ms,
                claim_idle_ms=settings.worker_claim_idle_ms,
                heartbeat_s=settings.worker_heartbeat_s,
                max_deliveries=settings.consumer_max_deliveries,
            )
        # The processor pipeline (processors/): reads the pipeline shards in group "processors".
        run_processors = settings.run_processors if processors is None else processors
        self.processor: StreamProcessor | None = None
        if run_processors:
            self.processor = StreamProcessor.from_settings(
                self.redis, self.consumers, self.keys, settings, self.dead_letters
            )
        # Checks a new generation must pass before it is queued (rate limits, ...): each raises
        # LimitExceeded (HTTP 429) to refuse. Called with (identity, model name).
        self.admission_checks: list[Callable[[str, str], Awaitable[None]]] = []
        # Rate limits and the response cache (processors/): admission, worker and pipeline.
        self.rate_limiter = RateLimiter(self.redis, self.keys, settings)
        if self.rate_limiter.enabled:
            self.admission_checks.append(self.rate_limiter.admit)
        self.cache = ResponseCache(self.redis, self.keys, settings)
        if self.worker is not None:
            self.worker.before_model.append(self.rate_limiter.track)
            if self.cache.enabled:
                self.worker.cache = self.cache
        self._group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def admit(self, identity: str, model: str) -> None:
        """Run every admission check; raises LimitExceeded if one refuses."""
        for check in self.admission_checks:
            await check(identity, model)

    def __repr__(self) -> str:
        return (
            f"<Runtime fanout={self.fanout!r} worker={self.worker!r} processor={self.processor!r}>"
        )

    async def __aenter__(self) -> Runtime:
        try:
            await self.redis.ping()
        except REDIS_DOWN_ERRORS as exc:
            await self._close_clients()
            raise RedisUnavailable(
                f"cannot reach Redis at TOKENBRIDGE_REDIS_URL ({_safe_url(self.url)}): "
                f"{str(exc).rstrip('.')}. "
                "Is Redis running there? Unset the variable to use the embedded server."
            ) from None
        try:
            await self.auth.start()
        except REDIS_DOWN_ERRORS as exc:
            await self._close_clients()
            raise RedisUnavailable(f"Redis failed during startup: {exc}") from None
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        await self.consumers.__aenter__()
        if self.fanout is not None:
            self._tasks.append(self._group.create_task(self.fanout.run()))
        if self.worker is not None:
            self._tasks.append(self._group.create_task(self.worker.run()))
        if self.processor is not None:
            self._tasks.append(self._group.create_task(self.processor.run()))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.fanout is not None:
            self.fanout.stop()
        if self.worker is not None:
            self.worker.stop()
        if self.processor is not None:
            self.processor.stop()
        assert self._group is not None
        try:
            # Consumers drain (bounded by shutdown_drain_s), then the loops return.
            await self.consumers.__aexit__(exc_type, exc, tb)
            if self._tasks:
                _, pending = await asyncio.wait(self._tasks, timeout=5)
                for task in pending:
                    task.cancel()
            await self._group.__aexit__(exc_type, exc, tb)
            if self.processor is not None:
                await self.processor.aclose()
        finally:
            await self._close_clients()

    async def _close_clients(self) -> None:
        for model in self.models.values():
            with contextlib.suppress(Exception):
                await model.aclose()
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
