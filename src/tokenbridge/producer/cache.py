"""The response cache: a repeated request is answered from Redis, through the same stream path.

Lookup (worker, before the model call, :meth:`ResponseCache.replay`): a cacheable request's
key is the sha256 of its canonical JSON (model entry, messages, params without ``rate`` and
``cache``). A hit is written to the session stream with ``Producer.write_events``: ``start``
marked ``cached``, the same token texts in the same order, ``end`` with the original reason
and usage; the model is not called. A miss leaves a note (generation -> key) for the fill.

Fill (``CachingProcessor`` in ``processors/cache.py``, from the pipeline): at a generation's
``end`` with reason ``stop`` or ``length`` and a note, its events are read back from the session
stream and kept only if complete (``start`` and every token ``1..n``, ``n`` equal to the
``end``'s count); errors, cancels, trimmed answers and answers with tool calls are never
cached. A redelivered entry finds the note gone and does nothing.

Cacheable: ``cache_enabled`` with the pipeline running the ``cache`` processor (nothing else
fills it), ``params.cache`` not false, and deterministic (temperature 0, or a ``demo`` model)
unless ``cache_scope`` is ``all``. A replay ignores ``params.rate``: it comes at once.

Bounds: entries expire after ``cache_ttl_s``; at most ``cache_max_entries`` (least recently
used evicted first); answers over ``cache_max_entry_bytes`` or longer than a producer's queue
are not kept.

Keys: ``<prefix>:{cache:<digest>}:answer`` (JSON; the entry's keys share its hash tag),
``<prefix>:cache:lru`` (sorted set digest -> last use ms), ``<prefix>:cache:gen:<gid>``
(the note).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from redis.asyncio import Redis

from tokenbridge.exceptions import InvalidEntry
from tokenbridge.producer.jobs import GenerationJob
from tokenbridge.producer.producer import Producer
from tokenbridge.settings import Settings
from tokenbridge.text import as_text
from tokenbridge.wire.events import Event, decode_entry, now_ms
from tokenbridge.wire.keys import Keys

__all__ = ["ResponseCache", "request_digest"]

log = logging.getLogger(__name__)

_PAGE = 512  # XREVRANGE COUNT when reading a finished generation back
_CACHED_REASONS = frozenset({"stop", "length"})
_FORMAT = 1


def request_digest(job: GenerationJob, model_entry: dict[str, Any]) -> str:
    """sha256 of the canonical request: model entry, messages, params (no rate, no cache)."""
    canonical = {
        "v": _FORMAT,
        "model": job.model,
        "entry": model_entry,
        "messages": [m.to_dict() for m in job.messages],
        "params": job.params.model_dump(exclude_none=True, exclude={"rate", "cache"}),
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class ResponseCache:
    """Answers in Redis, looked up by the worker and filled from the pipeline."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.ttl_ms = settings.cache_ttl_s * 1000
        self.note_ttl_s = settings.stream_max_generation_s + settings.stream_retention_s
        # write_events queues a whole answer at once: it must fit the producer's queue.
        self.max_tokens = settings.producer_max_pending - 2
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"<ResponseCache hits={self.hits} misses={self.misses}>"

    @property
    def enabled(self) -> bool:
        """On, and filled: the pipeline runs the ``cache`` processor."""
        settings = self.settings
        return (
            settings.cache_enabled and settings.pipeline_enabled and "cache" in settings.processors
        )

    def digest(self, job: GenerationJob) -> str | None:
        """The cache key of ``job``, or None if it must not be cached."""
        entry = self.settings.models.get(job.model)
        params = job.params
        if entry is None or not self.enabled or params.cache is False:
            return None
        deterministic = params.temperature == 0 or entry.adapter == "demo"
        if not deterministic and self.settings.cache_scope != "all":
            return None
        return request_digest(job, entry.model_dump(include={"adapter", "base_url", "model"}))

    def answer_key(self, digest: str) -> str:
        return self.keys.cache_answer(digest)

    @property
    def lru_key(self) -> str:
        return self.keys.cache_lru

    def note_key(self, generation_id: str) -> str:
        return self.keys.cache_note(generation_id)

    async def replay(self, job: GenerationJob, producer: Producer) -> bool:
        """Write the cached answer of ``job`` to its session stream; False on a miss (then
        the answer, once complete, fills the cache) or when ``job`` is not cacheable."""
        digest = self.digest(job)
        if digest is None:
            return False
        raw: Any = await self.redis.get(self.answer_key(digest))
        events = _replay_events(job, raw) if raw is not None else None
        if events is None:
            self.misses += 1
            await self.redis.set(self.note_key(job.generation_id), digest, ex=self.note_ttl_s)
            return False
        await self.redis.zadd(self.lru_key, {digest: now_ms()}, xx=True)  # used: evict last
        await producer.write_events(job, *events)
        self.hits += 1
        return True

    async def fill(self, session_id: str, generation_id: str) -> bool:
        """Keep the finished answer of ``generation_id`` if a lookup missed it (it left a
        note) and it is complete and successful; idempotent (the note is removed)."""
        raw: Any = await self.redis.get(self.note_key(generation_id))
        if raw is None:
            return False  # not cacheable, a replay, or already filled (a redelivery)
        answer = await self._read_answer(session_id, generation_id)
        stored = False
        if answer is not None:
            data = json.dumps(answer, separators=(",", ":"), ensure_ascii=False).encode()
            if len(data) <= self.settings.cache_max_entry_bytes:
                await self._store(raw.decode(), data)
                stored = True
        await self.redis.delete(self.note_key(generation_id))
        return stored

    async def _store(self, digest: str, data: bytes) -> None:
        now = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.answer_key(digest), data, px=self.ttl_ms)
            pipe.zadd(self.lru_key, {digest: now})
            # Members unused for a whole TTL belong to expired answers.
            pipe.zremrangebyscore(self.lru_key, "-inf", now - self.ttl_ms)
            pipe.zcard(self.lru_key)
            *_, size = await pipe.execute()
        excess = int(size) - self.settings.cache_max_entries
        if excess > 0:
            evicted: Any = await self.redis.zpopmin(self.lru_key, excess)
            # One DEL per entry: entries live on different slots (Cluster).
            async with self.redis.pipeline(transaction=False) as pipe:
                for member, _ in evicted:
                    pipe.delete(self.answer_key(as_text(member)))
                await pipe.execute()

    async def _read_answer(self, session_id: str, generation_id: str) -> dict[str, Any] | None:
        """The generation's answer read back from the session stream (newest first): its
        ``end``, every token ``1..n`` and its ``start``; None if it did not end with ``stop``
        or ``length``, is too long to replay, was itself a replay, or lost entries (trimmed)."""
        end: Event | None = None
        texts: dict[int, str] = {}
        key = self.keys.events(session_id)
        upper = "+"
        for _ in range(self.settings.stream_max_len * 2 // _PAGE + 1):  # bounded scan
            page: Any = await self.redis.xrevrange(key, upper, "-", count=_PAGE)
            for _, fields in page:
                try:
                    event = decode_entry(fields)
                except InvalidEntry:
                    continue  # another writer's bad entry; ours are checked by seq below
                if event.generation_id != generation_id:
                    continue
                if end is None:
                    if event.kind != "end" or event.reason not in _CACHED_REASONS:
                        return None
                    if event.seq != event.tokens + 1:
                        return None  # tool calls (a forced one ends with `stop`): text only here
                    if event.tokens > self.max_tokens:
                        return None
                    end = event
                elif event.kind == "token":
                    texts[event.seq] = event.text
                elif event.kind == "start":
                    n = end.tokens
                    if event.cached or sorted(texts) != list(range(1, n + 1)):
                        return None
                    tokens = [texts[seq] for seq in range(1, n + 1)]
                    return {"tokens": tokens, "reason": end.reason, "usage": end.usage}
            if len(page) < _PAGE:
                return None
            upper = "(" + as_text(page[-1][0])
        return None


def _replay_events(job: GenerationJob, raw: bytes) -> list[Event] | None:
    """The events that replay a stored answer; None (a miss) if it is not one of ours."""
    gid = job.generation_id
    try:
        answer = json.loads(raw)
        tokens = answer["tokens"]
        reason = answer["reason"]
        usage = answer.get("usage")
        if not all(isinstance(t, str) for t in tokens) or reason not in _CACHED_REASONS:
            raise ValueError("not a cached answer")
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("cached answer unreadable, ignored generation=%s", gid)
        return None
    events = [Event("start", gid, 0, model=job.model, cached=True)]
    events += [Event("token", gid, seq, text=text) for seq, text in enumerate(tokens, 1)]
    n = len(tokens)
    events.append(Event("end", gid, n + 1, reason=reason, tokens=n, usage=usage))
    return events
