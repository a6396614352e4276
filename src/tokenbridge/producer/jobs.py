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
    JsonValue,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic.config import JsonDict
from redis.asyncio import Redis

from tokenbridge.exceptions import InvalidEntry
from tokenbridge.producer.models.base import ChatRequest, GenerationParams
from tokenbridge.wire.events import now_ms
from tokenbridge.wire.keys import ID_PATTERN, Keys

__all__ = ["FunctionCall", "GenerationJob", "Message", "ToolCall", "submit_job"]


class FunctionCall(BaseModel):
    """The function an assistant message calls: its name and JSON arguments text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    arguments: str = Field(max_length=1_000_000, description="The call's arguments as JSON.")


class ToolCall(BaseModel):
    """A function call an assistant message made (OpenAI's ``tool_calls`` entry)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


_NULL: JsonDict = {"type": "null"}
_TEXT: JsonDict = {"type": "string"}
# The role rules of Message._fits_its_role, for the OpenAPI schema (and its fuzzer).
_ROLE_RULES: list[JsonValue] = [
    {
        "properties": {"role": {"enum": ["system", "developer", "user"]}, "content": _TEXT,
                       "tool_calls": _NULL, "tool_call_id": _NULL},
        "required": ["content"],
    },
    {
        "properties": {"role": {"const": "assistant"}, "content": _TEXT, "tool_call_id": _NULL},
        "required": ["content"],
    },
    {
        "properties": {"role": {"const": "assistant"}, "tool_calls": {"type": "array"},
                       "tool_call_id": _NULL},
        "required": ["tool_calls"],
    },
    {
        "properties": {"role": {"const": "tool"}, "content": _TEXT, "tool_call_id": _TEXT,
                       "tool_calls": _NULL},
        "required": ["content", "tool_call_id"],
    },
]  # fmt: skip


class Message(BaseModel):
    """One chat message in OpenAI's format (roles system, developer, user, assistant, tool).

    ``content`` may be null only on an assistant message that carries ``tool_calls``; a
    ``tool`` message answers the call named by its ``tool_call_id``. Dumped without the
    fields left unset, so a plain message is ``{"role": ..., "content": ...}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"anyOf": _ROLE_RULES})

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, min_length=1, max_length=128)
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=256)
    name: str | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _fits_its_role(self) -> Message:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message needs tool_call_id, and only it has one")
        if self.content is None and self.tool_calls is None:
            raise ValueError(f"a {self.role} message needs content")
        return self

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        """The message as adapters and digests see it (unset fields left out)."""
        data: dict[str, Any] = self.model_dump()
        return data

    @property
    def text_length(self) -> int:
        """Characters of content and tool-call arguments (the prompt size limit counts them)."""
        calls = self.tool_calls or ()
        return len(self.content or "") + sum(len(c.function.arguments) for c in calls)


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
    # Runs to its end even when no client reads it (no orphan_grace_s cancel, see worker.py).
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
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
