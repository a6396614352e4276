"""The model interface of the producer: what a generation asks for and what a model yields.

A :class:`ChatModel` turns a :class:`ChatRequest` into an async generator of :class:`Delta`
(one per token, in order) and :class:`ToolCallDelta` (one per streamed fragment of a function
call), followed by at most one :class:`Finish`. Failures are raised, never
yielded: :class:`~tokenbridge.exceptions.ProviderError` or
:class:`~tokenbridge.exceptions.ProviderTimeout`, each with a stable ``code``; their messages
never contain an API key. :class:`GenerationParams` is validated from a request's JSON
``params`` and is deliberately small and strict (unknown keys are rejected). Messages are in
OpenAI's chat format (docs/wire-format.md, "Job request"): each adapter maps them, and the
tools, to its own API.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "FINISH_REASONS",
    "ChatModel",
    "ChatRequest",
    "Delta",
    "Finish",
    "FunctionSpec",
    "FunctionTool",
    "GenerationParams",
    "NamedToolChoice",
    "ResponseFormat",
    "ToolCallDelta",
]

_StopString = Annotated[str, Field(min_length=1, max_length=64)]
_FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]

FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter"})
"""What a model's :class:`Finish` may say (the wire's ``end.reason`` has these and more)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FunctionSpec(_Strict):
    """A function the model may call: its name, what it does, its JSON Schema parameters."""

    name: _FunctionName
    description: str | None = Field(default=None, max_length=65_536)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(_Strict):
    """One entry of ``params.tools``, in OpenAI's form ``{"type": "function", "function": ...}``."""

    type: Literal["function"]
    function: FunctionSpec


class _NamedFunction(_Strict):
    name: _FunctionName


class NamedToolChoice(_Strict):
    """``tool_choice`` naming one function: ``{"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: _NamedFunction


class ResponseFormat(BaseModel):
    """``response_format``: ``text``, ``json_object`` or ``json_schema`` (forwarded as given)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    type: Literal["text", "json_object", "json_schema"]


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
    user: str | None = Field(
        default=None, max_length=256, description="End-user id, passed to the provider."
    )
    tools: list[FunctionTool] | None = Field(
        default=None, max_length=128, description="Functions the model may call (OpenAI form)."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="none | auto | required | one named function."
    )
    parallel_tool_calls: bool | None = Field(
        default=None, description="Whether the model may call several tools in one answer."
    )
    response_format: ResponseFormat | None = Field(
        default=None, description="text | json_object | json_schema (OpenAI-compatible only)."
    )


@dataclass(slots=True)
class ChatRequest:
    """A chat to complete: ``messages`` are OpenAI chat-format dicts (``role``, ``content``,
    and ``tool_calls`` / ``tool_call_id`` where they apply)."""

    messages: list[dict[str, Any]]
    params: GenerationParams = field(default_factory=GenerationParams)


@dataclass(slots=True)
class Delta:
    """One token of generated text."""

    text: str


@dataclass(slots=True)
class ToolCallDelta:
    """One streamed fragment of a function call.

    ``index`` says which call of the answer it belongs to; ``call_id`` and ``name`` are set on
    the first fragment of a call only; the concatenated ``arguments`` of a call are its JSON.
    """

    index: int
    arguments: str = ""
    call_id: str = ""
    name: str = ""


@dataclass(slots=True)
class Finish:
    """The end of a generation: ``reason`` is one of :data:`FINISH_REASONS`.

    ``usage`` holds ``prompt_tokens``, ``completion_tokens`` and ``total_tokens`` when the
    model reported them.
    """

    reason: str
    usage: dict[str, int] | None = None


class ChatModel(Protocol):
    """A model adapter. One instance serves many concurrent generations."""

    name: str

    def stream(self, request: ChatRequest) -> AsyncGenerator[Delta | ToolCallDelta | Finish, None]:
        """Yield a Delta per token (a ToolCallDelta per call fragment), then at most one
        Finish as the last item.

        Raises ProviderError / ProviderTimeout (with a stable ``code``) on failure, possibly
        after some Deltas were yielded. Closing the generator early (``aclose()``, e.g. via
        ``contextlib.aclosing``) releases the provider call.
        """
        ...

    async def aclose(self) -> None:
        """Release the adapter's resources (HTTP clients); the model is unusable after."""
        ...
