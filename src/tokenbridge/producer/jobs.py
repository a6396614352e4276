"""Generation jobs: what ``POST /v1/generations`` writes to the job stream for a worker to run.

A job is one entry of the job stream (``tb:jobs``) with one field, ``job``, holding JSON. Workers
read it with a consumer group, so each job runs on one worker, and a job left by a crashed
worker is reclaimed by another (see ``producer/worker.py``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis

from tokenbridge.exceptions import InvalidEntry
from tokenbridge.producer.models.base import ChatRequest, GenerationParams
from tokenbridge.wire.events import now_ms
from tokenbridge.wire.keys import ID_PATTERN, Keys

__all__ = ["GenerationJob", "Message", "submit_job"]


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str = Field(pattern=r"^(system|user|assistant)$")
    content: str


class GenerationJob(BaseModel):
    """Everything a worker needs to run one generation."""

    model_config = ConfigDict(extra="forbid")

    generation_id: str = Field(pattern=ID_PATTERN.pattern)
    session_id: str = Field(pattern=ID_PATTERN.pattern)
    model: str
    messages: list[Message]
    params: GenerationParams = Field(default_factory=GenerationParams)
    submitted_ms: int = Field(default_factory=now_ms)
    # Who asked (API key id, or client address without auth): token budgets charge it.
    identity: str | None = Field(default=None, max_length=256)

    def to_fields(self) -> dict[str, str]:
        return {"job": self.model_dump_json(exclude_none=True)}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> GenerationJob:
        """Decode a job entry; raise :class:`InvalidEntry` if it is not a valid job."""
        raw = fields.get(b"job")
        if raw is None:
            raise InvalidEntry("job entry has no 'job' field")
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise InvalidEntry(
                f"invalid job: {exc.error_count()} error(s): {exc.errors()[0]['msg']}"
            ) from None

    def chat_request(self) -> ChatRequest:
        messages: list[dict[str, Any]] = [m.model_dump() for m in self.messages]
        return ChatRequest(messages=messages, params=self.params)


async def submit_job(
    redis: Redis, keys: Keys, job: GenerationJob, max_len: int, lookup_ttl_s: int
) -> str:
    """Append ``job`` to the job stream (and record its session for cancel); returns its id."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(keys.generation(job.generation_id), job.session_id, ex=lookup_ttl_s)
        pipe.xadd(keys.jobs, job.to_fields(), maxlen=max_len, approximate=True)  # type: ignore[arg-type]
        _, entry_id = await pipe.execute()
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
