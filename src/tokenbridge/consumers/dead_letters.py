"""DeadLetters: entries that could not be processed, kept aside to be listed, replayed or purged.

An entry is dead-lettered when it cannot be decoded (its handler raised
:class:`~tokenbridge.exceptions.InvalidEntry`) or was delivered ``max_deliveries`` times without
success. The dead-letter stream (``<prefix>:dlq``, capped with ``MAXLEN ~``) keeps, per entry:
its source ``stream``, ``group``, original ``entry_id``, ``error``, ``deliveries``, the
``consumer`` that gave up, ``dead_ms`` and the original ``fields`` as JSON (bytes that are not
UTF-8 survive the round trip through ``surrogateescape``).

Moving is ``XADD`` to the dead letters, then ``XACK`` on the source: the two keys live on
different Cluster slots, so the move is at least once (a crash between the two may leave a
duplicate dead letter, never a lost entry). Replay appends the original fields to the source
stream as a new entry, then deletes the dead letter.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from tokenbridge.text import as_text
from tokenbridge.wire.events import now_ms

__all__ = ["DeadLetter", "DeadLetters"]

log = logging.getLogger(__name__)


def _fields_to_json(fields: dict[bytes, bytes]) -> str:
    return json.dumps(
        {
            k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
            for k, v in fields.items()
        }
    )


def _fields_from_json(raw: str) -> dict[bytes, bytes]:
    data = json.loads(raw)
    return {
        k.encode("utf-8", "surrogateescape"): v.encode("utf-8", "surrogateescape")
        for k, v in data.items()
    }


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered entry, as listed."""

    dlq_id: str
    stream: str
    group: str
    entry_id: str
    error: str
    deliveries: int
    consumer: str
    dead_ms: int
    fields: dict[bytes, bytes]

    def as_dict(self) -> dict[str, Any]:
        return {
            "dlq_id": self.dlq_id,
            "stream": self.stream,
            "group": self.group,
            "entry_id": self.entry_id,
            "error": self.error,
            "deliveries": self.deliveries,
            "consumer": self.consumer,
            "dead_ms": self.dead_ms,
            "fields": {
                k.decode("utf-8", "replace"): v.decode("utf-8", "replace")[:200]
                for k, v in self.fields.items()
            },
        }


class DeadLetters:
    """The dead-letter stream: move entries in, list, replay and purge them."""

    def __init__(self, redis: Redis, key: str, max_len: int = 100_000) -> None:
        self.redis = redis
        self.key = key
        self.max_len = max_len

    async def move(
        self,
        stream: str,
        group: str,
        entry_id: str,
        fields: dict[bytes, bytes],
        error: str,
        deliveries: int,
        consumer: str,
    ) -> str:
        """Dead-letter one entry and ack it on its source; returns the dead letter's id."""
        record = {
            "stream": stream,
            "group": group,
            "entry_id": entry_id,
            "error": error[:2000],
            "deliveries": deliveries,
            "consumer": consumer,
            "dead_ms": now_ms(),
            "fields": _fields_to_json(fields),
        }
        dlq_id = as_text(
            await self.redis.xadd(self.key, record, maxlen=self.max_len, approximate=True)  # type: ignore[arg-type]
        )
        await self.redis.xack(stream, group, entry_id)
        log.info(
            "entry dead-lettered stream=%s group=%s entry_id=%s deliveries=%d consumer=%s error=%s",
            stream,
            group,
            entry_id,
            deliveries,
            consumer,
            error[:200],
        )
        return dlq_id

    async def letters(self, count: int = 100, stream: str | None = None) -> list[DeadLetter]:
        """The oldest ``count`` dead letters (of ``stream`` only, if given)."""
        out: list[DeadLetter] = []
        cursor = "-"
        while len(out) < count:
            batch: Any = await self.redis.xrange(self.key, min=cursor, max="+", count=500)
            if not batch:
                break
            for raw_id, raw in batch:
                letter = self._decode(as_text(raw_id), raw)
                if stream is None or letter.stream == stream:
                    out.append(letter)
                    if len(out) >= count:
                        break
            cursor = "(" + as_text(batch[-1][0])
            if len(batch) < 500:
                break
        return out

    async def count(self) -> int:
        n: int = await self.redis.xlen(self.key)
        return n

    async def replay(self, ids: list[str] | None = None, stream: str | None = None) -> int:
        """Put dead letters back into their source streams (all, or ``ids``); returns how many."""
        letters = await self._select(ids, stream)
        for letter in letters:
            await self.redis.xadd(letter.stream, letter.fields)  # type: ignore[arg-type]
            await self.redis.xdel(self.key, letter.dlq_id)
        if letters:
            log.info("dead letters replayed count=%d", len(letters))
        return len(letters)

    async def purge(self, ids: list[str] | None = None, stream: str | None = None) -> int:
        """Delete dead letters (all, or ``ids``, or those of ``stream``); returns how many."""
        if ids is None and stream is None:
            n = await self.count()
            await self.redis.delete(self.key)
            return n
        letters = await self._select(ids, stream)
        if letters:
            await self.redis.xdel(self.key, *[letter.dlq_id for letter in letters])
        return len(letters)

    async def _select(self, ids: list[str] | None, stream: str | None) -> list[DeadLetter]:
        if ids is None:
            return await self.letters(count=1_000_000, stream=stream)
        out = []
        for dlq_id in ids:
            found: Any = await self.redis.xrange(self.key, min=dlq_id, max=dlq_id)
            if found:
                out.append(self._decode(dlq_id, found[0][1]))
        return out

    @staticmethod
    def _decode(dlq_id: str, raw: dict[bytes, bytes]) -> DeadLetter:
        return DeadLetter(
            dlq_id=dlq_id,
            stream=as_text(raw.get(b"stream", b"")),
            group=as_text(raw.get(b"group", b"")),
            entry_id=as_text(raw.get(b"entry_id", b"")),
            error=as_text(raw.get(b"error", b"")),
            deliveries=int(raw.get(b"deliveries", b"0") or 0),
            consumer=as_text(raw.get(b"consumer", b"")),
            dead_ms=int(raw.get(b"dead_ms", b"0") or 0),
            fields=_fields_from_json(as_text(raw.get(b"fields", b"{}"))),
        )
