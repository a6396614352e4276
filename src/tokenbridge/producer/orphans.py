"""OrphanWatch: a worker cancels, as ``abandoned``, the generations no client reads anywhere.

Who reads a session is told by the producer's own writes, at no extra command: the append
script answers, per batch, how many gateway processes its ``SPUBLISH`` reached
(``store/live.py``), i.e. how many are subscribed to the session's channel, which a gateway is
while a client (a stream, a WebSocket, a non-streamed request waiting for its answer) reads
the session there, and ``fanout_linger_s`` after the last one left. A generation that is not
``background`` is cancelled when, for ``orphan_grace_s`` counted from its start, every batch
it published reached nobody: its :class:`CancelSignal` is set with reason ``abandoned``, the
model call stops, and the stream ends with ``end reason=abandoned``. The effective grace after
the last client left is therefore ``orphan_grace_s`` plus the gateway's ``fanout_linger_s``.

A generation that published nothing for a while (a model thinking) has no fresh answer: once
its grace is over, and its last publish is older than ``check_s``, the watch asks
``PUBSUB SHARDNUMSUB`` on the node serving its channel (one command for all of them on
standalone Redis, one per such generation on a cluster).

Bounded: one task per worker process, checking every ``check_s`` (at most the worker
heartbeat, at most a quarter of the grace); no command while generations publish. Redis
errors skip a round; they never cancel anything.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from tokenbridge.producer.cancel import CancelSignal
from tokenbridge.producer.jobs import GenerationJob
from tokenbridge.store.live import channel_readers
from tokenbridge.tasks import run_every
from tokenbridge.wire.keys import Keys

__all__ = ["OrphanWatch"]

log = logging.getLogger(__name__)

_CHUNK = 1000  # channels per PUBSUB SHARDNUMSUB


@dataclass(slots=True)
class _Watched:
    session_id: str
    signal: CancelSignal
    read_at: float  # time.monotonic(): its start here, or the last publish someone received
    published_at: float = float("-inf")  # its last publish (time.monotonic())


class OrphanWatch:
    """The running generations of one worker that may be abandoned, and the loop that checks."""

    def __init__(self, redis: Redis, keys: Keys, grace_s: float, heartbeat_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.grace_s = grace_s
        self.check_s = max(0.05, min(heartbeat_s, grace_s / 4))
        self.abandoned = 0  # signals set (the worker counts the outcomes)
        self.asked = 0  # channels asked about with PUBSUB SHARDNUMSUB (silent generations)
        self._watched: dict[str, _Watched] = {}  # generation id -> its watch; bounded by jobs

    def __repr__(self) -> str:
        return f"<OrphanWatch watched={len(self._watched)} abandoned={self.abandoned}>"

    def watch(self, job: GenerationJob, signal: CancelSignal) -> None:
        """Watch ``job`` while it runs (nothing for a background job)."""
        if not job.background:
            self._watched[job.generation_id] = _Watched(job.session_id, signal, time.monotonic())

    def forget(self, generation_id: str) -> None:
        self._watched.pop(generation_id, None)

    def published(self, generation_id: str, readers: int) -> None:
        """A batch of ``generation_id`` reached ``readers`` gateway processes (the producer
        tells, from the append script's reply)."""
        watched = self._watched.get(generation_id)
        if watched is None:
            return
        watched.published_at = time.monotonic()
        if readers > 0:
            watched.read_at = watched.published_at

    async def run(self) -> None:
        """Check every ``check_s`` until cancelled."""
        await run_every(self.check_s, self.check, "orphan check", log)

    async def check(self) -> None:
        """Cancel, as abandoned, every watched generation past its grace nobody reads."""
        now = time.monotonic()
        due = [
            (gid, w)
            for gid, w in self._watched.items()
            if now - w.read_at >= self.grace_s and not w.signal.is_set()
        ]
        silent = [(gid, w) for gid, w in due if now - w.published_at > self.check_s]
        for start in range(0, len(silent), _CHUNK):
            chunk = silent[start : start + _CHUNK]
            channels = [self.keys.live(w.session_id).encode() for _, w in chunk]
            self.asked += len(channels)
            for (_, watched), readers in zip(
                chunk, await channel_readers(self.redis, channels), strict=True
            ):
                if readers > 0:
                    watched.read_at = now
        for gid, watched in due:
            if watched.read_at < now and not watched.signal.is_set():
                log.info(
                    "generation abandoned session=%s generation=%s grace_s=%s",
                    watched.session_id, gid, self.grace_s,
                )  # fmt: skip
                self.abandoned += 1
                watched.signal.cancel("abandoned")
