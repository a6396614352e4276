"""Gateway: the objects the gateway app owns for its life, handed to every route.

Routes read ``request.state.gateway`` (one typed object) instead of the process's Runtime:
the fan-out, auth, the connection manager, admission, the streaming options, and the two
seams every front door uses, :meth:`Gateway.open_stream` (the connection context manager,
``gateway/streaming.py``) and :meth:`Gateway.submit` (``gateway/submit.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection

from redis.asyncio import Redis

from tokenbridge.gateway.auth import Auth
from tokenbridge.gateway.client_connection import Transport
from tokenbridge.gateway.connection_manager import ConnectionManager
from tokenbridge.gateway.fanout import SessionFanout
from tokenbridge.gateway.streaming import SessionStream, StreamOptions
from tokenbridge.gateway.submit import GenerationSpec, Submission, SubmitContext, submit_generation
from tokenbridge.settings import Settings
from tokenbridge.wire.keys import Keys

__all__ = ["Gateway"]


class Gateway:
    """This process's gateway: what its routes need, and nothing of the worker's."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        keys: Keys,
        fanout: SessionFanout,
        auth: Auth,
        connections: ConnectionManager,
        models: Collection[str],
        admit: Callable[[str, str], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.fanout = fanout
        self.auth = auth
        self.connections = connections
        self.stream_options = StreamOptions(
            heartbeat_s=settings.sse_heartbeat_s,
            history_batch=settings.history_batch,
            idle_timeout_s=settings.connection_idle_timeout_s,
            retry_ms=settings.sse_retry_ms,
        )
        self.submit_context = SubmitContext(
            redis=redis,
            keys=keys,
            settings=settings,
            models=models,
            admit=admit,
            subscribe_token=auth.subscribe_token,
            token_ttl_s=auth.token_ttl_s,
        )

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
