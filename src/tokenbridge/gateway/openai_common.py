"""What the Chat Completions and Responses routes share: credentials, submit, streams.

Credentials are the API key of the native API, presented as OpenAI clients do
(``Authorization: Bearer``) or as Azure-style clients do (``api-key``, ``x-api-key``).
Generations go through the one submit path (:meth:`Gateway.submit`) and are read through the
one connection context (:meth:`Gateway.open_stream` and the pump), like the native routes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import Message as ASGIMessage
from starlette.types import Receive, Scope, Send

from tokenbridge.gateway.auth import Principal, key_principal
from tokenbridge.gateway.encodings.base import Chunk, Encoder
from tokenbridge.gateway.openai_errors import OpenAIParamError
from tokenbridge.gateway.openai_store import OpenAIStore
from tokenbridge.gateway.sse import EventStreamResponse
from tokenbridge.gateway.state import Gateway
from tokenbridge.gateway.submit import GenerationSpec, Submission
from tokenbridge.producer.jobs import Message
from tokenbridge.producer.models.base import GenerationParams

__all__ = ["StreamAnswer", "collect", "gateway_of", "openai_principal", "submit"]


def gateway_of(request: Request) -> tuple[Gateway, OpenAIStore]:
    gateway: Gateway = request.state.gateway
    return gateway, OpenAIStore(gateway.redis, gateway.keys)


def address_of(request: Request) -> str | None:
    return request.client.host if request.client else None


async def openai_principal(request: Request, unsafe: bool = False) -> Principal:
    """The API key from ``Authorization: Bearer``, ``api-key`` or ``x-api-key``."""
    auth = gateway_of(request)[0].auth
    if not auth.disabled and "authorization" not in request.headers:
        presented = request.headers.get("api-key") or request.headers.get("x-api-key")
        if presented:
            return await auth.check_key(presented.strip())
    return await key_principal(auth, request, unsafe=unsafe)


def _param_error(exc: ValidationError, prefix: str) -> OpenAIParamError:
    err = exc.errors()[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
    return OpenAIParamError(f"{prefix}{loc}".lstrip("."), err["msg"], "invalid_value")


async def submit(
    request: Request,
    principal: Principal,
    model: str,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    background: bool = False,
) -> Submission:
    """Queue the generation through the gateway's one submit path (limits, admission)."""
    job_messages = []
    for i, message in enumerate(messages):
        try:
            job_messages.append(Message.model_validate(message))
        except ValidationError as exc:
            raise _param_error(exc, f"messages[{i}]") from None
    try:
        job_params = GenerationParams.model_validate(params)
    except ValidationError as exc:
        raise _param_error(exc, "") from None
    spec = GenerationSpec(model, job_messages, job_params, background=background)
    return await gateway_of(request)[0].submit(principal.identity, spec)


class _NoSocket:
    """A pump transport that writes nowhere: answers gathered whole (non-stream)."""

    async def send(self, chunk: Chunk) -> int:
        return len(chunk)

    async def finish(self, chunk: Chunk | None) -> None:
        return None


async def collect(
    request: Request,
    session_id: str,
    encoder: Encoder,
    last_event_id: tuple[str, str] | None = None,
) -> str | None:
    """Run ``encoder`` over the session (history, then live) until it has finished; returns
    the connection's close reason (``done`` once finished; ``shutdown``, ``idle`` ... if not)."""
    stream = gateway_of(request)[0].open_stream(session_id, "sse", address_of(request))
    async with stream as conn:
        await stream.run(encoder, _NoSocket(), last_event_id)
    return conn.closed_reason


class StreamAnswer:
    """The shared SSE response with extra headers, and a step once the encoder finished."""

    def __init__(
        self,
        request: Request,
        session_id: str,
        encoder: Encoder,
        last_event_id: tuple[str, str] | None,
        headers: Sequence[tuple[str, str]] = (),
        on_finished: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        stream = gateway_of(request)[0].open_stream(session_id, "sse", address_of(request))
        self.response = EventStreamResponse(stream, encoder, last_event_id)
        self.encoder = encoder
        self.headers = [(k.encode(), v.encode()) for k, v in headers]
        self.on_finished = on_finished

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: ASGIMessage) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], *self.headers]}
            await send(message)

        await self.response(scope, receive, send_with_headers)
        if self.encoder.finished and self.on_finished is not None:
            await self.on_finished()
