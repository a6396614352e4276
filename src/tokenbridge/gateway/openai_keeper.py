"""ResponseKeeper: a stored response keeps its final object even when nobody reads it to the end.

The final object of a stored response (``store: true``, the default) is written by whoever
first sees its end: the request that streams or waits for it, a poll, a cancel. A background
response that nobody polls, or a stream whose client left, would otherwise have only its
session stream, which expires ``stream_retention_s`` after the end (an hour by default), and
would then poll as ``failed`` although ``openai_response_retention_s`` (a week) promises it.

So every stored response is listed in one sorted set, ``<prefix>:openai:unfinished`` (score:
``created_at``), until its final object is kept. Each gateway process sweeps it every
``sweep_s`` (a quarter of ``stream_retention_s``, at most a minute): for each listed response
one ``XREVRANGE ... COUNT 1`` tells whether its generation ended; an ended one is replayed once
and its final object kept (``HSETNX``: several gateways sweeping at once write it once). Cost
per round: one round trip per page of 100 listed responses, plus one replay per ended one.
A listed response that cannot be settled (an unreadable record) is logged and taken off the
list, so that it does not stop every later round at the same place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.asyncio import Redis

from tokenbridge.exceptions import InvalidRequest
from tokenbridge.gateway.encodings.openai_responses import ResponsesEncoder, ResponsesOptions
from tokenbridge.gateway.openai_store import OpenAIStore
from tokenbridge.gateway.resume import iter_history
from tokenbridge.store.client import REDIS_DOWN_ERRORS
from tokenbridge.wire.events import TERMINAL_KINDS
from tokenbridge.wire.keys import Keys

__all__ = ["DONE_STATUSES", "ResponseKeeper", "options_of", "replay_response"]

log = logging.getLogger(__name__)

_PAGE = 100
_MAX_PAGES = 1000  # per sweep: 100,000 listed responses; the rest wait for the next round
DONE_STATUSES = frozenset({"completed", "incomplete", "failed", "cancelled"})
_TERMINAL = frozenset(kind.encode() for kind in TERMINAL_KINDS)


def options_of(record: dict[str, Any], starting_after: int = -1) -> ResponsesOptions:
    """The encoder options of a stored response's request record."""
    return ResponsesOptions(
        base=record["base"],
        generation_id=record["generation_id"],
        background=record["base"]["background"],
        starting_after=starting_after,
    )


async def replay_response(
    redis: Redis,
    keys: Keys,
    store: OpenAIStore,
    session_id: str,
    record: dict[str, Any],
    history_batch: int,
) -> dict[str, Any]:
    """The response now, replayed from its session stream; kept once it has ended (stored)."""
    encoder = ResponsesEncoder(options_of(record))
    encoder.initial()
    events_key = keys.events(session_id)
    async for batch in iter_history(redis, events_key, session_id, "0", "0-0", history_batch):
        encoder.encode([batch])
        if encoder.finished:
            break
    snapshot = encoder.snapshot()
    if encoder.finished and record["base"]["store"]:
        await store.put_final(session_id, snapshot)
    return snapshot


class ResponseKeeper:
    """Keeps the final object of every stored response whose generation ended (module doc)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        store: OpenAIStore,
        *,
        history_batch: int,
        sweep_s: float,
        lifetime_s: float,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.store = store
        self.history_batch = history_batch
        self.sweep_s = sweep_s
        self.lifetime_s = lifetime_s  # the longest a session stream lives (generation + retention)
        self.kept = 0
        self._stop = asyncio.Event()

    def __repr__(self) -> str:
        return f"<ResponseKeeper kept={self.kept}>"

    async def run(self) -> None:
        """Sweep every ``sweep_s`` until :meth:`stop`; Redis errors wait for the next round."""
        while not self._stop.is_set():
            try:
                await self.sweep()
            except REDIS_DOWN_ERRORS as exc:
                log.warning("response keeper: redis unavailable (%s); next round", exc)
            except Exception:  # a bad record must not end the sweeps
                log.exception("response keeper: sweep failed; next round")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.sweep_s):
                    await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    async def sweep(self) -> int:
        """One pass over the listed responses; returns how many final objects it kept."""
        kept = 0
        cursor = 0
        for _ in range(_MAX_PAGES):
            listed = await self.store.unfinished(cursor, _PAGE)
            if not listed:
                break
            cursor += len(listed)
            async with self.redis.pipeline(transaction=False) as pipe:
                for session_id in listed:
                    pipe.xrevrange(self.keys.events(session_id), count=1)
                lasts: list[Any] = await pipe.execute()
            for session_id, last in zip(listed, lasts, strict=True):
                try:
                    outcome = await self._settle(session_id, last)
                except REDIS_DOWN_ERRORS:
                    raise
                except Exception:  # one bad record must not hold up every round at it
                    log.exception("response keeper: cannot settle session=%s; dropped", session_id)
                    await self.store.forget_unfinished(session_id)
                    outcome = "forgotten"
                kept += outcome == "kept"
                cursor -= outcome != "running"  # taken off the list: the next page starts earlier
            if len(listed) < _PAGE:
                break
        return kept

    async def _settle(self, session_id: str, last: list[Any]) -> str:
        """``kept`` (ended: final object written), ``running`` (not ended yet) or
        ``forgotten`` (its final was kept already, it was deleted, or it is lost)."""
        try:
            record, final = await self.store.response(session_id)
        except InvalidRequest:  # deleted, or expired with its record
            final, record = None, None
        if record is not None and final is None:
            if not last:  # queued, or lost once past the longest a stream can live
                if time.time() < float(record["base"]["created_at"]) + self.lifetime_s:
                    return "running"
            else:
                fields = last[0][1]
                ended = fields.get(b"kind") in _TERMINAL
                if not ended or fields.get(b"gen") != record["generation_id"].encode():
                    return "running"
                snapshot = await replay_response(
                    self.redis, self.keys, self.store, session_id, record, self.history_batch
                )
                if snapshot["status"] not in DONE_STATUSES:  # its end is not in the stream
                    return "running"
                self.kept += 1
                return "kept"
        await self.store.forget_unfinished(session_id)
        return "forgotten"
