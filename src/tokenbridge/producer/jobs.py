"""Generation jobs: what ``POST /v1/generations`` writes to the job stream for a worker to run.

A job is one entry of the job stream (``tb:jobs``) with one field, ``job``, holding JSON. Workers
read it with a consumer group, so each job runs on one worker, and a job left by a crashed
worker is reclaimed by another (see ``producer/worker.py``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)
from redis.asyncio import Redis

from tokenbridge.exceptions import InvalidEntry
from tokenbridge.producer.models.base import ChatRequest, GenerationParams
from tokenbridge.text import as_text
from tokenbridge.wire.events import now_ms
from tokenbridge.wire.keys import ID_PATTERN, Keys

__all__ = ["FunctionCall", "GenerationJob", "Message", "ToolCall", "submit_job"]


class FunctionCall(BaseModel):
    """The function an assistant message calls: its name and JSON arguments text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=256)
    arguments: str = Field(max_length=1_000_000)


class ToolCall(BaseModel):
    """One tool call of an assistant message (OpenAI chat format)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    """One chat message (OpenAI chat format; content-part arrays are flattened by the route).

    ``tool`` messages answer the call ``tool_call_id`` names; ``assistant`` messages may carry
    ``tool_calls`` and no content.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: str = Field(pattern=r"^(system|developer|user|assistant|tool)$")
    content: str | None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128)
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=256)
    name: str | None = Field(default=None, min_length=1, max_length=256)

    @model_serializer(mode="wrap")
    def _without_unset_tool_fields(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Unset tool fields are left out, so that a plain message dumps as ``{role, content}``
        everywhere (adapters, prompt digests, cache keys, the job JSON) as it always did."""
        data = handler(self)
        for name in ("tool_calls", "tool_call_id", "name"):
            if data.get(name) is None:
                data.pop(name, None)
        return data

    def to_dict(self) -> dict[str, Any]:
        """The message as adapters and digests see it."""
        data: dict[str, Any] = self.model_dump()
        return data

    @property
    def text_length(self) -> int:
        """Characters of content and tool-call arguments (the prompt size limit counts them)."""
        calls = sum(len(c.function.arguments) for c in self.tool_calls or ())
        return len(self.content or "") + calls


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
    # A background generation is never cancelled as abandoned (no client reading it).
    background: bool = False

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
        messages: list[dict[str, Any]] = [m.to_dict() for m in self.messages]
        return ChatRequest(messages=messages, params=self.params)


async def submit_job(
    redis: Redis, keys: Keys, job: GenerationJob, max_len: int, lookup_ttl_s: int
) -> str:
    """Append ``job`` to the job stream (and record its session for cancel); returns its id."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(keys.generation(job.generation_id), job.session_id, ex=lookup_ttl_s)
        pipe.xadd(keys.jobs, job.to_fields(), maxlen=max_len, approximate=True)  # type: ignore[arg-type]
        _, entry_id = await pipe.execute()
    return as_text(entry_id)
