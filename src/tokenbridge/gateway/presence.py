"""SessionPresence: tells the workers, through Redis, which sessions some client is reading.

A generation that nobody reads for ``orphan_grace_s`` is cancelled as ``abandoned`` by its
worker (``producer/orphans.py``). What the worker looks at is one key per session,
``<prefix>:{<session>}:presence`` (hash-tagged with the session), which every gateway process
with a live connection to the session keeps alive: ``SET key <node id> PX <ttl>``, where the
TTL is ``orphan_grace_s + refresh_s``. So the key exists while a connection is open on ANY
node, and disappears between ``orphan_grace_s`` and ``orphan_grace_s + refresh_s`` after the
last one closed, without any process having to say so (a node that dies stops refreshing).

Bounded: one task per process (:meth:`run`), not one per connection. Every ``refresh_s``
(the connection heartbeat interval, or a third of the grace if that is shorter) it writes the
key of every session with a connection here, pipelined; a new connection is written within one
round trip (:meth:`opened` wakes the task), so a client that connects late in the grace
period is seen in time. Redis errors are logged and retried at the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection

from redis.asyncio import Redis

from tokenbridge.gateway.connection_manager import ConnectionManager
from tokenbridge.settings import Settings
from tokenbridge.store.client import REDIS_DOWN_ERRORS
from tokenbridge.wire.keys import Keys

__all__ = ["SessionPresence", "presence_for", "presence_refresh_s"]

log = logging.getLogger(__name__)

_CHUNK = 1000  # keys per pipelined round trip


def presence_refresh_s(orphan_grace_s: float, heartbeat_s: float) -> float:
    """How often a gateway refreshes its sessions' presence keys."""
    return max(0.05, min(heartbeat_s, orphan_grace_s / 3))


def presence_for(
    settings: Settings, redis: Redis, keys: Keys, node_id: str, connections: ConnectionManager
) -> contextlib.AbstractAsyncContextManager[object]:
    """The gateway's SessionPresence, hooked to its connections (nothing if the rule is off)."""
    if settings.orphan_grace_s <= 0:
        return contextlib.nullcontext()
    presence = SessionPresence(
        redis,
        keys,
        connections.session_ids,
        node_id,
        orphan_grace_s=settings.orphan_grace_s,
        heartbeat_s=settings.connection_heartbeat_s,
    )
    connections.on_session_open = presence.opened
    return presence


class SessionPresence:
    """Keeps ``<prefix>:{<session>}:presence`` alive for every session read on this process.

    ``sessions`` returns the ids of the sessions with a live connection here (the
    ConnectionManager's). Use as ``async with SessionPresence(...):`` (its task is started,
    then cancelled and awaited on exit).
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        sessions: Callable[[], Collection[str]],
        node_id: str,
        *,
        orphan_grace_s: float,
        heartbeat_s: float,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.sessions = sessions
        self.node_id = node_id
        self.refresh_s = presence_refresh_s(orphan_grace_s, heartbeat_s)
        self.ttl_ms = max(1, int((orphan_grace_s + self.refresh_s) * 1000))
        self.written = 0
        self.failed = 0
        self.skipped = 0  # connections opened on a session whose key was fresh
        self._opened: set[str] = set()  # bounded by the connections opened since the last write
        # Sessions written in the last ``refresh_s`` -> when (bounded: pruned every full round).
        self._written_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<SessionPresence refresh_s={self.refresh_s} written={self.written}>"

    def opened(self, session_id: str) -> None:
        """A connection to ``session_id`` opened here: mark the session at once, unless this
        process wrote its key less than ``refresh_s`` ago (then the key outlives the grace,
        and the next full refresh, due within ``refresh_s``, writes it again)."""
        written = self._written_at.get(session_id)
        if written is not None and time.monotonic() - written < self.refresh_s:
            self.skipped += 1
            return
        self._opened.add(session_id)
        self._wake.set()

    async def __aenter__(self) -> SessionPresence:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="session-presence")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        """Refresh every ``refresh_s``, and at once for new connections, until cancelled."""
        next_full = time.monotonic()
        while True:
            wait_s = next_full - time.monotonic()
            if wait_s > 0 and not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):  # a timer: presence is periodic
                        await self._wake.wait()
            self._wake.clear()
            batch, self._opened = self._opened, set()
            now = time.monotonic()
            if now >= next_full:
                batch.update(self.sessions())
                next_full = now + self.refresh_s
                old = now - self.refresh_s
                self._written_at = {sid: t for sid, t in self._written_at.items() if t > old}
            if batch:
                await self._write(sorted(batch))

    async def _write(self, session_ids: list[str]) -> None:
        node = self.node_id.encode()
        started = time.monotonic()  # the keys live at least ``ttl_ms`` from here
        try:
            for start in range(0, len(session_ids), _CHUNK):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for session_id in session_ids[start : start + _CHUNK]:
                        pipe.set(self.keys.presence(session_id), node, px=self.ttl_ms)
                    await pipe.execute()
                for session_id in session_ids[start : start + _CHUNK]:
                    self._written_at[session_id] = started
            self.written += len(session_ids)
        except REDIS_DOWN_ERRORS as exc:
            self.failed += 1
            log.debug("presence refresh failed sessions=%d (%s)", len(session_ids), exc)
