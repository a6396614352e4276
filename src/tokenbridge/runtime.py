"""Runtime: the process's Redis clients, its task group, the worker and the processors.

``async with Runtime(settings) as rt:`` connects (a clear :class:`RedisUnavailable` if it
cannot) and, if asked, starts a generation worker and the processor pipeline
(``StreamProcessor``) in one ``TaskGroup``. Leaving stops the loops, gives running generations
``drain_s`` to finish, cancels what is left (cancelled generations get their ``end`` event),
then closes clients. Start: Redis, loops; stop: the reverse. The gateway's own objects (fan-out,
auth, connections, admission) are not here: the app's lifespan builds them on top
(``gateway/state.py``), sharing these clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from functools import partial
from types import TracebackType

from redis.asyncio import Redis

from tokenbridge.consumers.dead_letters import DeadLetters
from tokenbridge.consumers.stream_consumer_service import StreamConsumerService
from tokenbridge.exceptions import ConfigurationError, RedisUnavailable
from tokenbridge.presence import presence_of
from tokenbridge.processors.stream_processor import StreamProcessor
from tokenbridge.producer.cache import ResponseCache
from tokenbridge.producer.models import build_models
from tokenbridge.producer.models.base import ChatModel
from tokenbridge.producer.producer import Producer
from tokenbridge.producer.worker import GenerationWorker
from tokenbridge.rate_limits import RateLimiter
from tokenbridge.settings import Settings
from tokenbridge.settings_sources import safe_url
from tokenbridge.store.client import (
    REDIS_DOWN_ERRORS,
    blocking_client,
    close_client,
    command_client,
)
from tokenbridge.store.scripts import Scripts
from tokenbridge.tasks import stop_within
from tokenbridge.wire.keys import Keys

__all__ = ["Runtime"]

log = logging.getLogger(__name__)


class Runtime:
    """The process's shared resources: Redis clients, producer, optional worker and processors."""

    def __init__(
        self,
        settings: Settings,
        *,
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
            cluster=settings.redis_cluster,
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
            outage_s=settings.redis_outage_s,
            max_pending_bytes=settings.producer_max_pending_bytes,
            history_s=settings.stream_history_s,
            history_max_len=settings.stream_history_max_len,
        )
        self.models: dict[str, ChatModel] = build_models(settings)
        self.dead_letters = DeadLetters(self.redis, self.keys.dead_letters, settings.dlq_max_len)
        self.consumers = StreamConsumerService(
            self.redis,
            partial(
                blocking_client,
                url,
                settings.consumer_block_ms,
                client_name=self.client_name,
                cluster=settings.redis_cluster,
            ),
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
                block_ms=settings.consumer_block_ms,
                claim_idle_ms=settings.consumer_claim_idle_ms,
                heartbeat_s=settings.consumer_heartbeat_s,
                max_deliveries=settings.consumer_max_deliveries,
                orphan_grace_s=settings.orphan_grace_s,
            )
        # The processor pipeline (processors/): reads the pipeline shards in group "processors".
        run_processors = settings.run_processors if processors is None else processors
        self.processor: StreamProcessor | None = None
        if run_processors:
            self.processor = StreamProcessor.from_settings(
                self.redis, self.consumers, self.keys, settings, self.dead_letters
            )
        # Rate limits (the worker notes who pays) and the response cache (the worker replays).
        self.rate_limiter = RateLimiter(self.redis, self.keys, settings)
        self.cache = ResponseCache(self.redis, self.keys, settings)
        if self.worker is not None:
            self.worker.before_model.append(self.rate_limiter.track)
            if self.cache.enabled:
                self.worker.cache = self.cache
        self.presence = presence_of(self)  # the deployment view (presence.py)
        self._group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def __repr__(self) -> str:
        return f"<Runtime worker={self.worker!r} processor={self.processor!r}>"

    async def __aenter__(self) -> Runtime:
        try:
            await self.redis.ping()
        except REDIS_DOWN_ERRORS as exc:
            await self._close_clients()
            raise RedisUnavailable(
                f"cannot reach Redis at TOKENBRIDGE_REDIS_URL ({safe_url(self.url)}): "
                f"{str(exc).rstrip('.')}. "
                "Is Redis running there? Unset the variable to use the embedded server."
            ) from None
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        await self.consumers.__aenter__()
        if self.worker is not None:
            self._tasks.append(self._group.create_task(self.worker.run()))
        if self.processor is not None:
            self._tasks.append(self._group.create_task(self.processor.run()))
        self._tasks.append(self._group.create_task(self.presence.run()))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.processor is not None:
            self.processor.stop()
        self.presence.stop()
        assert self._group is not None
        try:
            # Consumers drain (bounded by shutdown_drain_s), then the loops return.
            await self.consumers.__aexit__(exc_type, exc, tb)
            await stop_within(self._tasks, 5)
            await self._group.__aexit__(exc_type, exc, tb)
            if self.processor is not None:
                await self.processor.aclose()
        finally:
            await self._close_clients()

    async def _close_clients(self) -> None:
        for model in self.models.values():
            with contextlib.suppress(Exception):
                await model.aclose()
        await close_client(self.redis)
