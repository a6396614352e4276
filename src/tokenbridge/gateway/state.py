"""Gateway: the objects the gateway app owns for its life, handed to every route.

Built and entered by the app's lifespan (``gateway/app.py``) on top of the process's
:class:`~tokenbridge.runtime.Runtime`, whose Redis clients it shares: the fan-out and its
readers (started here, stopped and awaited on exit), auth, the connection manager, admission,
and the two seams every front door uses, :meth:`Gateway.open_stream` (the connection context
manager, ``gateway/streaming.py``) and :meth:`Gateway.submit` (``gateway/submit.py``).
Routes read ``request.state.gateway``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from types import TracebackType

from redis.asyncio import Redis

from tokenbridge.exceptions import RedisUnavailable
from tokenbridge.gateway.admission import Admission
from tokenbridge.gateway.auth import Auth
from tokenbridge.gateway.client_connection import Transport
from tokenbridge.gateway.connection_manager import ConnectionManager
from tokenbridge.gateway.fanout import SessionFanout
from tokenbridge.gateway.openai_keeper import ResponseKeeper
from tokenbridge.gateway.openai_store import OpenAIStore
from tokenbridge.gateway.streaming import SessionStream, StreamOptions
from tokenbridge.gateway.submit import GenerationSpec, Submission, SubmitContext, submit_generation
from tokenbridge.settings import Settings
from tokenbridge.store.client import REDIS_DOWN_ERRORS
from tokenbridge.store.scripts import Scripts
from tokenbridge.tasks import stop_within
from tokenbridge.wire.keys import Keys

__all__ = ["Gateway"]


class Gateway:
    """This process's gateway: what its routes need, and nothing of the worker's."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        *,
        url: str,
        node_id: str,
        client_name: str,
        models: Collection[str],
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys = Keys(settings.key_prefix)
        self.fanout = SessionFanout(
            redis,
            Scripts(redis),
            keys,
            history_batch=settings.history_batch,
            orphan_ttl_ms=settings.stream_retention_s * 1000,
            recent_events=settings.fanout_recent_events,
            linger_s=settings.fanout_linger_s,
            probe_s=settings.fanout_probe_s,
            repair_concurrency=settings.fanout_repair_concurrency,
            batch_events=settings.fanout_batch_events,
            node_id=node_id,
            # A live message proves the stream's epoch then; a renewal after it is published
            # too. Only an expiry is silent, and the keys live at least this long after a write.
            epoch_trust_s=min(settings.stream_retention_s, settings.stream_max_generation_s) / 2,
        )
        self.auth = Auth(redis, keys, settings)
        self.connections = ConnectionManager(
            settings.connection_max_buffered_events,
            max_connections=settings.limits_max_connections,
            max_per_session=settings.limits_max_connections_per_session,
            max_per_address=settings.limits_max_connections_per_address,
            idle_timeout_s=settings.connection_idle_timeout_s,
            max_buffered_bytes=settings.connection_max_buffered_bytes,
        )
        self.admission = Admission.from_settings(redis, keys, settings)
        self.stream_options = StreamOptions(
            heartbeat_s=settings.connection_heartbeat_s,
            history_batch=settings.history_batch,
            idle_timeout_s=settings.connection_idle_timeout_s,
            retry_ms=settings.sse_retry_ms,
        )
        self.submit_context = SubmitContext(
            redis=redis,
            keys=keys,
            settings=settings,
            models=models,
            admit=self.admission,
            subscribe_token=self.auth.subscribe_token,
            token_ttl_s=self.auth.token_ttl_s,
        )
        # Stored OpenAI responses keep their final object even if nobody reads them to the end.
        self.response_keeper = ResponseKeeper(
            redis,
            keys,
            OpenAIStore(redis, keys),
            history_batch=settings.history_batch,
            sweep_s=min(60.0, max(0.5, settings.stream_retention_s / 4)),
            lifetime_s=settings.stream_max_generation_s + settings.stream_retention_s,
        )
        self._fanout_task: asyncio.Task[None] | None = None
        self._keeper_task: asyncio.Task[None] | None = None
        self.started_s = int(time.time())  # the `created` of the models it lists

    def __repr__(self) -> str:
        return f"<Gateway {self.fanout!r} {self.connections!r} {self.admission!r}>"

    async def __aenter__(self) -> Gateway:
        try:
            await self.auth.start()
        except REDIS_DOWN_ERRORS as exc:
            raise RedisUnavailable(f"Redis failed during startup: {exc}") from None
        loop = asyncio.get_running_loop()
        self._fanout_task = loop.create_task(self.fanout.run())
        self._keeper_task = loop.create_task(self.response_keeper.run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.fanout.stop()
        self.response_keeper.stop()
        tasks = [task for task in (self._fanout_task, self._keeper_task) if task is not None]
        self._fanout_task = self._keeper_task = None
        await stop_within(tasks, 5)
        for task in tasks:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error

    def open_stream(
        self, session_id: str, transport: Transport, address: str | None
    ) -> SessionStream:
        """Register a connection (``LimitExceeded`` / ``Draining`` if refused) for streaming."""
        return SessionStream(
            self.fanout, self.connections, self.stream_options, session_id, transport, address
        )

    async def submit(self, identity: str, spec: GenerationSpec) -> Submission:
        """:func:`submit_generation` with this gateway's limits, models and admission."""
        return await submit_generation(self.submit_context, identity, spec)
