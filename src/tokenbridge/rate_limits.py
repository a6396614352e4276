"""Rate limits: generations started and tokens used per minute, per API key and per model.

Two scopes, each optional, each enforced across every gateway and worker process by one
atomic Lua script on the shared Redis (the GCRA of ``store/scripts.py``; docs/architecture.md,
"Rate limits"):

* per key: one API key (with auth disabled, every caller is ``anonymous``) on one model:
  ``rate_limit_generations`` and ``rate_limit_tokens_per_minute``;
* per model: all keys together on one model: ``rate_limit_model_generations`` and
  ``rate_limit_model_tokens_per_minute``.

:meth:`RateLimiter.admit` is one of the gateway's admission checks (``gateway/admission.py``):
it runs before a job is queued, so a refused request never reaches a model; it raises
:class:`LimitExceeded` (HTTP 429 with ``Retry-After``) naming the limit that was hit. A
generation limit takes one unit per admitted generation; a token budget is only checked there
(is any of it left?) and charged later, as the pipeline sees the tokens, by
``processors/rate_limit.py``: a long answer can overdraw the budget, and the debt delays the
next admits. Charges are exact under redelivery: each pipeline entry is charged at most once per
scope (a marker set in the same script). Answers replayed from the cache cost no tokens (no
provider call).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from tokenbridge.exceptions import LimitExceeded
from tokenbridge.producer.jobs import GenerationJob
from tokenbridge.settings import RATE_PATTERN, Settings
from tokenbridge.store.scripts import RateLimitCheck, Scripts
from tokenbridge.wire.keys import Keys

__all__ = ["Rate", "RateLimiter", "parse_rate"]

log = logging.getLogger(__name__)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_UNITS |= {"second": 1, "minute": 60, "hour": 3600, "day": 86_400}
_RATE = re.compile(RATE_PATTERN)
_KNOWN_GENERATIONS = 4096  # generation -> identity remembered by one processor (bounded LRU)


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` per ``period_s`` seconds, parsed from ``"10/minute"`` or ``"100/30s"``."""

    count: int
    period_s: int
    text: str

    def per(self) -> str:
        return self.text.partition("/")[2]


def parse_rate(text: str) -> Rate:
    """Parse a rate setting (``N/second|minute|hour|day`` or ``N/<k>s|m|h|d``)."""
    if not _RATE.fullmatch(text):
        raise ValueError(f"{text!r} is not a rate such as 10/minute or 100/30s")
    count, _, per = text.partition("/")
    if per in _UNITS:
        return Rate(int(count), _UNITS[per], text)
    return Rate(int(count), int(per[:-1]) * _UNITS[per[-1]], text)


@dataclass(frozen=True, slots=True)
class _Limit:
    field: str  # "gen" or "tok" in the scope's hash
    count: int
    period_s: int
    code: str
    setting: str
    what: str  # "generations per minute", for the message


class _Scope:
    """One scope's limits: per key (on one model) or per model."""

    def __init__(self, kind: str, generations: Rate | None, tokens_per_minute: int | None) -> None:
        self.kind = kind
        prefix = "" if kind == "key" else "model_"
        self.limits: list[_Limit] = []
        if generations is not None:
            self.limits.append(
                _Limit(
                    "gen",
                    generations.count,
                    generations.period_s,
                    f"{prefix}generation_rate_exceeded",
                    f"TOKENBRIDGE_RATE_LIMIT_{prefix.upper()}GENERATIONS={generations.text}",
                    f"{generations.count} generations per {generations.per()}",
                )
            )
        self.tokens: _Limit | None = None
        if tokens_per_minute is not None:
            self.tokens = _Limit(
                "tok",
                tokens_per_minute,
                60,
                f"{prefix}token_rate_exceeded",
                f"TOKENBRIDGE_RATE_LIMIT_{prefix.upper()}TOKENS_PER_MINUTE={tokens_per_minute}",
                f"{tokens_per_minute} tokens per minute",
            )
            self.limits.append(self.tokens)

    def checks(self) -> list[RateLimitCheck]:
        return [
            RateLimitCheck(limit.field, limit.count, limit.period_s, 1, limit.field == "gen")
            for limit in self.limits
        ]

    def who(self, identity: str, model: str) -> str:
        return f"{identity} on model {model!r}" if self.kind == "key" else f"model {model!r}"


class RateLimiter:
    """The configured limits, checked at admission and charged from the pipeline."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = Scripts(redis)
        self.ttl_s = settings.stream_max_generation_s + settings.stream_retention_s
        self.once_ttl_ms = settings.once_ttl_ms()  # as long as an entry can be redelivered
        self._key = _Scope(
            "key",
            _rate(settings.rate_limit_generations),
            settings.rate_limit_tokens_per_minute,
        )
        self._model = _Scope(
            "model",
            _rate(settings.rate_limit_model_generations),
            settings.rate_limit_model_tokens_per_minute,
        )
        self.scopes = [s for s in (self._key, self._model) if s.limits]
        self.token_scopes = [s for s in self.scopes if s.tokens is not None]

    def __repr__(self) -> str:
        limits = [limit.setting for scope in self.scopes for limit in scope.limits]
        return f"<RateLimiter {' '.join(limits) or 'off'}>"

    @property
    def enabled(self) -> bool:
        return bool(self.scopes)

    def scope_key(self, scope: _Scope, identity: str, model: str) -> str:
        """The scope's hash; a digest, so that no identity can break out of its hash tag."""
        parts = [identity, model] if scope.kind == "key" else [model]
        digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]
        return self.keys.rate_limit(scope.kind, digest)

    async def admit(self, identity: str, model: str) -> None:
        """Admission check: take one generation from each scope, or raise LimitExceeded."""
        taken: list[_Scope] = []
        for scope in self.scopes:
            key = self.scope_key(scope, identity, model)
            refused, retry_s = await self.scripts.rate_limit("admit", key, scope.checks())
            if refused:
                # Give back what earlier scopes took: a refused request costs nothing.
                for done in taken:
                    await self.scripts.rate_limit(
                        "refund", self.scope_key(done, identity, model), _takes(done)
                    )
                limit = scope.limits[refused - 1]
                log.debug(  # per request: at INFO, a client in a retry loop would flood it
                    "generation refused code=%s identity=%s model=%s retry_after_s=%.1f",
                    limit.code,
                    identity,
                    model,
                    retry_s,
                )
                raise LimitExceeded(
                    limit.code,
                    f"{scope.who(identity, model)} is over its limit of {limit.what} "
                    f"({limit.setting}); retry in {max(1, math.ceil(retry_s))} s",
                    retry_s,
                )
            taken.append(scope)

    async def track(self, job: GenerationJob) -> None:
        """Note who pays for ``job``'s tokens, for the pipeline (a worker hook, before the
        model call; nothing to do without token budgets or an identity)."""
        if not self.token_scopes or job.identity is None:
            return
        await self.redis.set(self._note(job.generation_id), job.identity, ex=self.ttl_s)

    async def identity_of(self, generation_id: str) -> str | None:
        """Who :meth:`track` noted for ``generation_id``; None if untracked (a replay)."""
        raw: Any = await self.redis.get(self._note(generation_id))
        return raw.decode() if isinstance(raw, bytes) else raw

    async def charge(self, once_key: str, identity: str, model: str, tokens: int) -> bool:
        """Charge ``tokens`` to the token budgets of (``identity``, ``model``) and of
        ``model``, once per ``once_key``; False if there was nothing (more) to charge."""
        if tokens <= 0:
            return False
        applied = False
        for scope in self.token_scopes:
            assert scope.tokens is not None
            key = self.scope_key(scope, identity, model)
            check = RateLimitCheck("tok", scope.tokens.count, 60, tokens)
            once = Keys.once(key, once_key)
            result, _ = await self.scripts.rate_limit(
                "charge", key, [check], once, self.once_ttl_ms
            )
            applied = applied or result == 0
        return applied

    def _note(self, generation_id: str) -> str:
        return self.keys.rate_limit_note(generation_id)


def _rate(text: str | None) -> Rate | None:
    return parse_rate(text) if text is not None else None


def _takes(scope: _Scope) -> list[RateLimitCheck]:
    return [c for c in scope.checks() if c.take]
