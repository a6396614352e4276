"""The model interface of the producer: what a generation asks for and what a model yields.

A :class:`ChatModel` turns a :class:`ChatRequest` into an async generator of :class:`Delta`
(one per token, in order) followed by at most one :class:`Finish`. Failures are raised, never
yielded: :class:`~tokenbridge.exceptions.ProviderError` or
:class:`~tokenbridge.exceptions.ProviderTimeout`, each with a stable ``code``; their messages
never contain an API key. :class:`GenerationParams` is validated from a request's JSON
``params`` and is deliberately small and strict (unknown keys are rejected).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ChatModel", "ChatRequest", "Delta", "Finish", "GenerationParams"]

_StopString = Annotated[str, Field(min_length=1, max_length=64)]


class GenerationParams(BaseModel):
    """Sampling options of one generation; every field is optional, ``None`` means default."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate.")

    @field_validator("max_tokens", "seed", mode="before")
    @classmethod
    def _integral_float(cls, value: object) -> object:
        """JSON Schema counts 5.0 as an integer; so do we (strict mode would refuse it)."""
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            return int(value)
        return value

    temperature: float | None = Field(default=None, ge=0, le=2, description="Sampling temp.")
    top_p: float | None = Field(default=None, ge=0, le=1, description="Nucleus sampling mass.")
    stop: list[_StopString] | None = Field(
        default=None, max_length=4, description="Up to 4 stop sequences of at most 64 chars."
    )
    seed: int | None = Field(
        default=None, ge=-(2**63), le=2**63 - 1, description="Sampling seed (64-bit)."
    )
    rate: float | None = Field(
        default=None,
        ge=0,
        le=1_000_000,
        description="Demo model only: tokens per second; 0 means as fast as possible.",
    )
    cache: bool | None = Field(
        default=None,
        description="false: never answer from the response cache nor fill it (never sent on).",
    )
    user: str | None = Field(default=None, max_length=256, description="End-user id.")
    tools: list[dict[str, Any]] | None = Field(
        default=None, max_length=128, description="OpenAI function tools the model may call."
    )
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, description='"none", "auto", "required" or a named function.'
    )
    parallel_tool_calls: bool | None = Field(default=None, description="Several calls at once.")
    response_format: dict[str, Any] | None = Field(
        default=None, description="OpenAI response_format (text, json_object, json_schema)."
    )


@dataclass(slots=True)
class ChatRequest:
    """A chat to complete: ``messages`` are OpenAI chat-format dicts (``role``, ``content``,
    and for tool use ``tool_calls`` / ``tool_call_id`` / ``name``)."""

    messages: list[dict[str, Any]]
    params: GenerationParams = field(default_factory=GenerationParams)


@dataclass(slots=True)
class Delta:
    """One token of generated text."""

    text: str


@dataclass(slots=True)
class Finish:
    """The end of a generation: ``reason`` is ``"stop"`` or ``"length"``.

    ``usage`` holds ``prompt_tokens``, ``completion_tokens`` and ``total_tokens`` when the
    model reported them.
    """

    reason: str
    usage: dict[str, int] | None = None


class ChatModel(Protocol):
    """A model adapter. One instance serves many concurrent generations."""

    name: str

    def stream(self, request: ChatRequest) -> AsyncGenerator[Delta | Finish, None]:
        """Yield a Delta per token, then at most one Finish as the last item.

        Raises ProviderError / ProviderTimeout (with a stable ``code``) on failure, possibly
        after some Deltas were yielded. Closing the generator early (``aclose()``, e.g. via
        ``contextlib.aclosing``) releases the provider call.
        """
        ...

    async def aclose(self) -> None:
        """Release the adapter's resources (HTTP clients); the model is unusable after."""
        ...
