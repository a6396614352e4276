"""What the OpenAI-compatible routes keep in Redis beside the session stream.

A chat completion and a response each run as one generation in a session of their own, and
their public id names that session: ``chatcmpl-<session id>``, ``resp_<session id>``. So any
gateway node finds everything from the id alone, and every key shares the session's hash tag
(``tb:{s_…}:openai``; one Redis Cluster slot with the session's stream).

``tb:{sid}:openai`` is a hash:

==========  ===========================================================================
field       value (JSON)
==========  ===========================================================================
chat        a chat completion's constants: generation id, model, ``created``, usage flag
response    a response's request: generation id, model, ``created_at``, input as chat
            messages, instructions, tools, flags (background, store), previous id
final       the response object once it ended (written by whoever first sees the end)
==========  ===========================================================================

A chat record lives as long as the session stream (``stream_max_generation_s +
stream_retention_s``); a stored response for ``openai_response_retention_s``. Stored responses
whose final object is not kept yet are listed in ``tb:openai:unfinished`` (a sorted set by
``created_at``) for ``gateway/openai_keeper.py``, which keeps it before the stream expires.
"""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from tokenbridge.exceptions import InvalidRequest
from tokenbridge.wire.keys import ID_PATTERN, Keys

__all__ = [
    "CHAT_PREFIX",
    "RESPONSE_PREFIX",
    "OpenAIStore",
    "session_of",
]

CHAT_PREFIX = "chatcmpl-"
RESPONSE_PREFIX = "resp_"


def session_of(public_id: str, prefix: str, what: str) -> str:
    """The session id inside ``chatcmpl-<sid>`` / ``resp_<sid>``; 404 if it is not one."""
    session_id = public_id[len(prefix) :] if public_id.startswith(prefix) else ""
    if not ID_PATTERN.fullmatch(session_id):
        raise InvalidRequest(f"{what}_not_found", f"no {what} {public_id[:80]!r}", 404)
    return session_id


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class OpenAIStore:
    """Reads and writes the ``:openai`` hash of a session."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    def key(self, session_id: str) -> str:
        return f"{self.keys.prefix}:{{{session_id}}}:openai"

    @property
    def unfinished_key(self) -> str:
        """Sorted set of the stored responses whose final object is not kept yet (score:
        ``created_at``), swept by ``gateway/openai_keeper.py``."""
        return f"{self.keys.prefix}:openai:unfinished"

    async def _put(self, session_id: str, field: str, record: dict[str, Any], ttl_s: int) -> None:
        key = self.key(session_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, field, _dumps(record))
            pipe.expire(key, ttl_s)
            await pipe.execute()

    async def _get(self, session_id: str, field: str) -> dict[str, Any] | None:
        raw: Any = await self.redis.hget(self.key(session_id), field)
        if raw is None:
            return None
        record: dict[str, Any] = json.loads(raw)
        return record

    async def put_chat(self, session_id: str, record: dict[str, Any], ttl_s: int) -> None:
        await self._put(session_id, "chat", record, ttl_s)

    async def chat(self, session_id: str) -> dict[str, Any] | None:
        return await self._get(session_id, "chat")

    async def put_response(self, session_id: str, record: dict[str, Any], ttl_s: int) -> None:
        """Store a response's request record, listed as unfinished until its final is kept."""
        await self._put(session_id, "response", record, ttl_s)
        await self.redis.zadd(self.unfinished_key, {session_id: record["base"]["created_at"]})

    async def unfinished(self, offset: int, count: int) -> list[str]:
        """Listed unfinished responses (their session ids), oldest first."""
        raw: list[Any] = await self.redis.zrange(self.unfinished_key, offset, offset + count - 1)
        return [item.decode() if isinstance(item, bytes) else item for item in raw]

    async def forget_unfinished(self, session_id: str) -> None:
        await self.redis.zrem(self.unfinished_key, session_id)

    async def response(self, session_id: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The response's request record and its final object (None while it runs);
        404 ``response_not_found`` if there is no such (stored) response."""
        raw: Any = await self.redis.hmget(self.key(session_id), ["response", "final"])
        if raw[0] is None:
            raise InvalidRequest(
                "response_not_found", f"no response {RESPONSE_PREFIX}{session_id}", 404
            )
        final = json.loads(raw[1]) if raw[1] is not None else None
        return json.loads(raw[0]), final

    async def put_final(self, session_id: str, response: dict[str, Any]) -> None:
        """Keep the ended response (only if the record still exists: not after a delete)."""
        key = self.key(session_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hexists(key, "response")
            pipe.hsetnx(key, "final", _dumps(response))
            exists, _ = await pipe.execute()
        if not exists:
            await self.redis.delete(key)
        await self.forget_unfinished(session_id)

    async def delete(self, session_id: str) -> bool:
        """Forget a response (its request and final object); False if there was none."""
        await self.forget_unfinished(session_id)
        return bool(await self.redis.delete(self.key(session_id)))
