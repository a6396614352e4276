"""AnalyticsProcessor: generations, tokens, TTFT, tokens/s, durations, errors and cancels.

Figures per generation, per session, per model and in total, kept in Redis (every process
sees the same ones) and exact under redelivery, in any order of arrival:

1. **Per batch** (one Lua script, keys of the session's slot): the batch is recorded once under
   its first ``seq`` (``HSETNX <prefix>:{sid}:stats:seen:<gid> <first seq>``, so a redelivery,
   or a replay under a new entry id, changes nothing); its event and token counts are added to
   the generation's hash, with the start time, the earliest token's time and, from the
   terminal event, the outcome, the usage and the terminal ``seq``.
2. **Completion**: a generation is complete when it has counted ``terminal seq + 1`` events,
   i.e. every event from ``start`` to ``end``/``error``, whichever batch came last. The script
   marks it ``done`` and returns its raw figures until they are applied.
3. **Roll-up**: the figures become counter increments, applied with
   :class:`~tokenbridge.store.once.ApplyOnce` keyed on the generation: once to the session
   (``<prefix>:{sid}:stats``), once to the totals and the model
   (``<prefix>:{stats}:total``, ``<prefix>:{stats}:model:<name>``: one hash tag, one Cluster
   slot per call), with the time bucket of its terminal event (``store/series.py``:
   the dashboard's last 15 minutes). Then the generation is marked ``applied``. A crash in
   between: the entry is delivered again, the script returns the figures again, ApplyOnce
   skips what was applied.

Token count of a generation: the provider's ``usage.completion_tokens`` from the ``end`` event
when given, else the number of ``token`` events; never characters. Time to first token: start
``ts`` to the first token's ``ts``. Tokens/s: tokens over the time from the first token to the
terminal event (generations with at least 2 tokens). Duration: start to terminal event.

A generation missing a batch (trimmed from the pipeline before a processor read it) never
completes and is not counted; its keys expire after ``analytics_retention_s``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from tokenbridge.processors.batcher import (
    ScriptCall,
    follow_up_each,
    process_one,
    run_script_group,
)
from tokenbridge.settings import Settings
from tokenbridge.store.once import ApplyOnce
from tokenbridge.store.series import TTL_MS as SERIES_TTL_MS
from tokenbridge.store.series import bucket_of, series_increments
from tokenbridge.text import as_text
from tokenbridge.wire.events import now_ms
from tokenbridge.wire.keys import Keys
from tokenbridge.wire.pipeline import PipelineBatch

__all__ = ["AnalyticsProcessor", "GenerationFigures"]

log = logging.getLogger(__name__)

_MAX_MODELS = 1000  # distinct model names counted; more go to "(other)"
_MAX_SESSION_GENERATIONS = 1000  # generations listed per session (newest kept)
_MAX_MODEL_NAME = 128

_BATCH = """
local gen, seen, gens = KEYS[1], KEYS[2], KEYS[3]
local ttl = ARGV[1]
local function raw()
  if redis.call('HEXISTS', gen, 'applied') == 1 then return false end
  return redis.call('HMGET', gen, 'model', 'token_events', 'usage_completion',
    'prompt_tokens', 'start_ts', 'first_ts', 'end_ts', 'outcome', 'cached')
end
if redis.call('HEXISTS', gen, 'done') == 1 then return raw() end
if redis.call('HSETNX', seen, ARGV[3], '1') == 1 then
  redis.call('PEXPIRE', seen, ttl)
  redis.call('HINCRBY', gen, 'events', ARGV[4])
  redis.call('HINCRBY', gen, 'token_events', ARGV[5])
  if ARGV[6] ~= '' then redis.call('HSETNX', gen, 'model', ARGV[6]) end
  if ARGV[7] ~= '' then
    redis.call('HSET', gen, 'start_ts', ARGV[7], 'cached', ARGV[8])
    redis.call('ZADD', gens, ARGV[7], ARGV[2])
    redis.call('ZREMRANGEBYRANK', gens, 0, -(tonumber(ARGV[15]) + 1))
    redis.call('PEXPIRE', gens, ttl)
  end
  if ARGV[9] ~= '' then
    local seq = redis.call('HGET', gen, 'first_seq')
    if (not seq) or tonumber(ARGV[9]) < tonumber(seq) then
      redis.call('HSET', gen, 'first_seq', ARGV[9], 'first_ts', ARGV[10])
    end
  end
  if ARGV[11] ~= '' then
    redis.call('HSET', gen, 'last_seq', ARGV[11], 'end_ts', ARGV[12], 'outcome', ARGV[13])
    if ARGV[14] ~= '' then redis.call('HSET', gen, 'usage_completion', ARGV[14]) end
    if ARGV[16] ~= '' then redis.call('HSET', gen, 'prompt_tokens', ARGV[16]) end
  end
  redis.call('PEXPIRE', gen, ttl)
end
local last = redis.call('HGET', gen, 'last_seq')
if not last then return false end
if tonumber(redis.call('HGET', gen, 'events')) < tonumber(last) + 1 then return false end
redis.call('HSET', gen, 'done', '1')
redis.call('DEL', seen)
return raw()
"""


@dataclass(frozen=True, slots=True)
class GenerationFigures:
    """A finished generation's figures (times in ms; None where they do not apply)."""

    model: str
    outcome: str  # stop | length | cancelled | error:<code>
    tokens: int
    prompt_tokens: int | None
    cached: bool
    ttft_ms: int | None
    duration_ms: int | None
    rate_ms: int | None  # time base of tokens/s: first token to terminal event

    @classmethod
    def compute(
        cls,
        model: str,
        outcome: str,
        tokens: int,
        start_ts: int | None,
        first_ts: int | None,
        end_ts: int | None,
        prompt_tokens: int | None = None,
        cached: bool = False,
    ) -> GenerationFigures:
        ttft = first_ts - start_ts if first_ts is not None and start_ts is not None else None
        duration = end_ts - start_ts if end_ts is not None and start_ts is not None else None
        rate_ms = None
        if first_ts is not None and end_ts is not None and tokens >= 2 and end_ts > first_ts:
            rate_ms = end_ts - first_ts
        return cls(
            model,
            outcome,
            tokens,
            prompt_tokens,
            cached,
            None if ttft is None else max(0, ttft),
            None if duration is None else max(0, duration),
            rate_ms,
        )

    @property
    def tokens_per_s(self) -> float | None:
        return None if self.rate_ms is None else self.tokens * 1000 / self.rate_ms

    def increments(self) -> dict[str, int | float]:
        """The counters this generation adds to its session, its model and the totals."""
        inc: dict[str, int | float] = {"generations": 1, "tokens": self.tokens}
        if self.prompt_tokens is not None:
            inc["prompt_tokens"] = self.prompt_tokens
        if self.outcome.startswith("error:"):
            inc["errors"] = 1
            inc[self.outcome] = 1  # "error:<code>"
        elif self.outcome == "cancelled":
            inc["cancels"] = 1
        if self.cached:
            inc["cached"] = 1
        if self.ttft_ms is not None:
            inc["ttft_ms_sum"] = self.ttft_ms
            inc["ttft_n"] = 1
        if self.duration_ms is not None:
            inc["duration_ms_sum"] = self.duration_ms
            inc["duration_n"] = 1
        if self.rate_ms is not None:
            inc["rate_tokens"] = self.tokens
            inc["rate_ms"] = self.rate_ms
        return inc


def _outcome(batch: PipelineBatch) -> str:
    terminal = batch.terminal
    if terminal is None:
        return ""
    return terminal.reason if terminal.kind == "end" else f"error:{terminal.code}"


def _n(value: Any) -> int | None:
    text = as_text(value)
    return int(text) if text else None


class AnalyticsProcessor:
    """Counts generations into Redis: per generation, session, model and in total; exact."""

    name = "analytics"

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = settings.analytics_retention_s * 1000
        self.once = ApplyOnce(redis, settings.once_ttl_ms())
        self._script: AsyncScript = redis.register_script(_BATCH)
        self.generations_counted = 0

    def __repr__(self) -> str:
        return f"<AnalyticsProcessor generations_counted={self.generations_counted}>"

    async def process(self, batch: PipelineBatch, entry_id: str) -> None:
        """Add ``batch`` to its generation; roll the generation up once it is complete."""
        await process_one(self.process_many, batch, entry_id)

    async def process_many(
        self, items: Sequence[tuple[PipelineBatch, str]]
    ) -> list[Exception | None]:
        """:meth:`process` for a group of entries: their scripts in one round trip."""
        replies = await run_script_group(
            self.redis, self._script, [self._call(batch) for batch, _ in items]
        )
        return await follow_up_each(
            items, replies, lambda b, raw: self._roll_up(b.session_id, b.generation_id, raw)
        )

    def _call(self, batch: PipelineBatch) -> ScriptCall:
        sid, gid = batch.session_id, batch.generation_id
        start = batch.start
        first = batch.first_token
        terminal = batch.terminal
        usage = terminal.usage if terminal is not None and terminal.usage else {}
        completion = usage.get("completion_tokens")
        prompt = usage.get("prompt_tokens")
        keys = [
            self.keys.generation_stats(sid, gid),
            self.keys.generation_stats_seen(sid, gid),
            self.keys.session_stats_generations(sid),
        ]
        args = [
            self.ttl_ms,
            gid,
            batch.first_seq,
            len(batch.events),
            batch.token_count,
            (batch.model or (start.model if start else ""))[:_MAX_MODEL_NAME],
            "" if start is None else start.ts,
            "1" if start is not None and start.cached else "",
            "" if first is None else first.seq,
            "" if first is None else first.ts,
            "" if terminal is None else terminal.seq,
            "" if terminal is None else terminal.ts,
            _outcome(batch),
            "" if completion is None else completion,
            _MAX_SESSION_GENERATIONS,
            "" if prompt is None else prompt,
        ]
        return keys, args

    async def _roll_up(self, session_id: str, generation_id: str, raw: list[Any]) -> None:
        model, token_events, completion, prompt, start, first, end, outcome, cached = raw
        completion_tokens = _n(completion)
        figures = GenerationFigures.compute(
            as_text(model) or "(unknown)",
            as_text(outcome),
            completion_tokens if completion_tokens is not None else _n(token_events) or 0,
            _n(start),
            _n(first),
            _n(end),
            _n(prompt),
            as_text(cached) == "1",
        )
        increments = figures.increments()
        marker = f"gen:{generation_id}"
        session_key = self.keys.session_stats(session_id)
        await self.once.hincrby(session_key, marker, {session_key: increments})
        model_name = await self._model_name(figures.model)
        series = self.keys.stats_series(bucket_of(_n(end) or now_ms()))
        await self.once.hincrby(
            self.keys.stats_scope,
            marker,
            {
                self.keys.stats_total: increments,
                self.keys.stats_model(model_name): increments,
                self.keys.stats_models: {model_name: 1},
                series: series_increments(
                    model_name,
                    figures.outcome,
                    figures.tokens,
                    figures.ttft_ms,
                    figures.tokens_per_s,
                ),
            },
        )
        await self.redis.pexpire(series, SERIES_TTL_MS)
        gen_key = self.keys.generation_stats(session_id, generation_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(gen_key, mapping=_stored(figures))
            pipe.pexpire(gen_key, self.ttl_ms)
            pipe.pexpire(self.keys.session_stats(session_id), self.ttl_ms)
            await pipe.execute()
        self.generations_counted += 1

    async def _model_name(self, model: str) -> str:
        """The model's name, or "(other)" once _MAX_MODELS distinct names are counted."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hexists(self.keys.stats_models, model)
            pipe.hlen(self.keys.stats_models)
            known, count = await pipe.execute()
        return model if known or int(count) < _MAX_MODELS else "(other)"


def _stored(figures: GenerationFigures) -> dict[Any, Any]:
    stored: dict[Any, Any] = {"applied": 1, "tokens": figures.tokens}
    for name in ("ttft_ms", "duration_ms", "rate_ms"):
        value = getattr(figures, name)
        if value is not None:
            stored[name] = value
    return stored
