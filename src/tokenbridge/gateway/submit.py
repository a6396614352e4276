"""submit_generation: the one path from a route to a queued generation.

Every front door (``POST /v1/generations``, the OpenAI-compatible routes) parses its own body,
builds a :class:`GenerationSpec` and calls :func:`submit_generation`: it validates the spec
against this gateway's limits and model table, runs the admission checks (rate limits: 429),
and appends the job to the job stream, recording the generation's session for cancel. The
response cache is looked up by the worker that takes the job (``producer/``): a hit is
replayed into the session stream like a live answer, so routes stream it the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from tokenbridge.exceptions import InvalidRequest
from tokenbridge.gateway.encodings.base import GenerationInfo
from tokenbridge.producer.jobs import GenerationJob, Message, submit_job
from tokenbridge.producer.models.base import GenerationParams
from tokenbridge.settings import Settings
from tokenbridge.wire.keys import Keys, new_generation_id, new_session_id

__all__ = ["GenerationSpec", "Submission", "SubmitContext", "submit_generation"]

Admit = Callable[[str, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class GenerationSpec:
    """What a route asks for, already parsed: ``session_id`` None makes a new session."""

    model: str
    messages: list[Message]
    params: GenerationParams = field(default_factory=GenerationParams)
    session_id: str | None = None
    background: bool = False


@dataclass(frozen=True, slots=True)
class Submission:
    """A queued generation: where to stream it and with which subscribe token."""

    session_id: str
    generation_id: str
    model: str
    created_s: int
    token: str
    token_expires_in_s: int

    @property
    def events_url(self) -> str:
        return f"/v1/sessions/{self.session_id}/events?token={self.token}"

    @property
    def ws_url(self) -> str:
        return f"/v1/sessions/{self.session_id}/ws?token={self.token}"

    @property
    def info(self) -> GenerationInfo:
        """What an encoding streaming this one generation needs (OpenAI ids and times)."""
        return GenerationInfo(self.generation_id, self.model, self.created_s)

    def to_json(self) -> dict[str, Any]:
        """The body of ``POST /v1/generations``' 202."""
        return {
            "session_id": self.session_id,
            "generation_id": self.generation_id,
            "token": self.token,
            "token_expires_in_s": self.token_expires_in_s,
            "events_url": self.events_url,
            "ws_url": self.ws_url,
        }


@dataclass(frozen=True, slots=True)
class SubmitContext:
    """What submitting needs of the gateway (its :class:`~tokenbridge.gateway.state.Gateway`
    builds one): Redis, key names, limits, the model names, admission and token minting."""

    redis: Redis
    keys: Keys
    settings: Settings
    models: Collection[str]
    admit: Admit
    subscribe_token: Callable[[str], str]
    token_ttl_s: int


def validate_spec(ctx: SubmitContext, spec: GenerationSpec) -> None:
    """Raise :class:`InvalidRequest` (404/413/422) if ``spec`` breaks this gateway's limits."""
    settings = ctx.settings
    if spec.model not in ctx.models:
        known = ", ".join(sorted(ctx.models))
        raise InvalidRequest("unknown_model", f"unknown model {spec.model!r}; known: {known}", 404)
    if len(spec.messages) > settings.max_messages:
        raise InvalidRequest("too_many_messages", f"at most {settings.max_messages} messages", 413)
    if sum(m.text_length for m in spec.messages) > settings.max_prompt_chars:
        raise InvalidRequest(
            "prompt_too_large", f"prompt over {settings.max_prompt_chars} characters", 413
        )
    if (spec.params.max_tokens or 0) > settings.max_tokens_limit:
        raise InvalidRequest(
            "max_tokens_too_large", f"params.max_tokens over {settings.max_tokens_limit}", 422
        )


async def submit_generation(ctx: SubmitContext, identity: str, spec: GenerationSpec) -> Submission:
    """Validate, admit (``LimitExceeded``: 429), enqueue; the typed result of a queued job."""
    validate_spec(ctx, spec)
    await ctx.admit(identity, spec.model)
    job = GenerationJob(
        generation_id=new_generation_id(),
        session_id=spec.session_id or new_session_id(),
        model=spec.model,
        messages=spec.messages,
        params=spec.params,
        identity=identity,
        background=spec.background,
    )
    settings = ctx.settings
    lookup_ttl_s = settings.stream_max_generation_s + settings.stream_retention_s
    await submit_job(ctx.redis, ctx.keys, job, settings.jobs_max_len, lookup_ttl_s)
    return Submission(
        session_id=job.session_id,
        generation_id=job.generation_id,
        model=job.model,
        created_s=job.submitted_ms // 1000,
        token=ctx.subscribe_token(job.session_id),
        token_expires_in_s=ctx.token_ttl_s,
    )
