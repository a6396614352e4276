"""The Responses API: create (stream, background, store), retrieve and resume, cancel, delete.

A response is one generation in a session of its own (``resp_<session id>``); its events are
the session stream encoded by ``gateway/encodings/openai_responses.py``, a pure function of
that stream, so any node can poll it (replay and snapshot), re-stream it from ``starting_after``
(a full replay with the first events left out) or cancel it. What is not in the stream lives in
``tb:{sid}:openai`` (``gateway/openai_store.py``): the request (for ``previous_response_id``
and the object's constant fields) and, once it ended, the final object, both kept
``openai_response_retention_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenbridge.exceptions import InvalidRequest
from tokenbridge.gateway import encodings
from tokenbridge.gateway.encodings.base import StreamContext
from tokenbridge.gateway.encodings.openai_responses import (
    ResponsesEncoder,
    events_of_final,
)
from tokenbridge.gateway.frames import Batch, Frame
from tokenbridge.gateway.openai_common import (
    StreamAnswer,
    collect,
    gateway_of,
    openai_principal,
    submit,
)
from tokenbridge.gateway.openai_errors import OpenAIParamError, openai_endpoint
from tokenbridge.gateway.openai_keeper import DONE_STATUSES, options_of, replay_response
from tokenbridge.gateway.openai_requests import ResponsesBody, parse_responses
from tokenbridge.gateway.openai_store import RESPONSE_PREFIX, OpenAIStore, session_of
from tokenbridge.gateway.request_body import json_body
from tokenbridge.gateway.state import Gateway
from tokenbridge.producer.cancel import request_cancel
from tokenbridge.store.client import REDIS_DOWN_ERRORS

__all__ = ["cancel_response", "create_response", "delete_response", "retrieve_response"]

_CANCEL_WAIT_S = 5.0
_SSE = "text/event-stream"


def _base(response_id: str, body: ResponsesBody, created_at: int) -> dict[str, Any]:
    """The Response object's fields that do not change while it runs."""
    params = body.params
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "model": body.model,
        "background": body.background,
        "instructions": body.instructions,
        "max_output_tokens": params.get("max_tokens"),
        "metadata": body.metadata or {},
        "parallel_tool_calls": params.get("parallel_tool_calls", True),
        "previous_response_id": body.previous_response_id,
        "store": body.store,
        "temperature": params.get("temperature"),
        "text": {"format": {"type": "text"}},
        "tool_choice": body.tool_choice,
        "tools": body.tools,
        "top_p": params.get("top_p"),
        "truncation": "disabled",
        "user": params.get("user"),
    }


def _assistant_turn(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the assistant message that continues the chat."""
    text = "".join(
        part.get("text", "")
        for item in output
        if item.get("type") == "message"
        for part in item.get("content", [])
    )
    calls = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in output
        if item.get("type") == "function_call"
    ]
    if not text and not calls:
        return []
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message]


async def _snapshot(
    gateway: Gateway, store: OpenAIStore, session_id: str, record: dict[str, Any]
) -> dict[str, Any]:
    """The response now: replayed from its session stream (kept once it has ended)."""
    history_batch = gateway.settings.history_batch
    return await replay_response(
        gateway.redis, gateway.keys, store, session_id, record, history_batch
    )


async def _conversation(
    gateway: Gateway, store: OpenAIStore, body: ResponsesBody
) -> list[dict[str, Any]]:
    """The chat so far (``previous_response_id``'s, with its answer) and this input."""
    if body.previous_response_id is None:
        return body.input
    previous = body.previous_response_id
    try:
        session_id = session_of(previous, RESPONSE_PREFIX, "response")
        record, final = await store.response(session_id)
    except InvalidRequest:
        raise OpenAIParamError(
            "previous_response_id", f"no stored response {previous[:80]!r}", "response_not_found"
        ) from None
    if final is None:
        final = await _snapshot(gateway, store, session_id, record)
    if final["status"] not in DONE_STATUSES:
        raise InvalidRequest(
            "previous_response_in_progress", f"{previous} has not finished yet", 409
        )
    return [*record["conversation"], *_assistant_turn(final["output"]), *body.input]


@openai_endpoint
async def create_response(request: Request) -> Response:
    """Start a response: streamed, answered whole, or in the background (``queued``)."""
    gateway, store = gateway_of(request)
    gateway.connections.ensure_accepting()
    principal = await openai_principal(request, unsafe=True)
    body = parse_responses(await json_body(request))
    conversation = await _conversation(gateway, store, body)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages = [*system, *conversation]
    submitted = await submit(
        request, principal, body.model, messages, body.params, background=body.background
    )
    session_id = submitted.session_id
    record = {
        "generation_id": submitted.generation_id,
        "base": _base(RESPONSE_PREFIX + session_id, body, submitted.created_s),
        "conversation": conversation,
    }
    if body.store:
        await store.put_response(session_id, record, gateway.settings.openai_response_retention_s)
    if body.background and not body.stream:
        encoder = ResponsesEncoder(options_of(record))
        encoder.initial()
        return JSONResponse(encoder.snapshot())
    return await _answer(request, session_id, record, -1, body.stream)


async def _answer(
    request: Request, session_id: str, record: dict[str, Any], starting_after: int, stream: bool
) -> Response:
    """The response's events from the start of its stream: streamed, or gathered whole."""
    _, store = gateway_of(request)
    ctx = StreamContext(session_id, options_of(record, starting_after))
    encoder = encodings.get("openai_responses").open(ctx)
    assert isinstance(encoder, ResponsesEncoder)

    async def keep_final() -> None:
        if record["base"]["store"]:
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await store.put_final(session_id, encoder.snapshot())

    if stream:
        return StreamAnswer(  # type: ignore[return-value]  # a raw ASGI app
            request, session_id, encoder, None, on_finished=keep_final
        )
    await collect(request, session_id, encoder)
    await keep_final()
    return JSONResponse(encoder.snapshot())


async def _load(request: Request) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    _, store = gateway_of(request)
    response_id = request.path_params["response_id"]
    session_id = session_of(response_id, RESPONSE_PREFIX, "response")
    record, final = await store.response(session_id)
    return session_id, record, final


def _starting_after(request: Request) -> int:
    raw = request.query_params.get("starting_after")
    if raw is None:
        return -1
    if not raw.isdigit() or len(raw) > 9:
        raise OpenAIParamError("starting_after", "starting_after must be an integer >= 0")
    return int(raw)


@openai_endpoint
async def retrieve_response(request: Request) -> Response:
    """The response now, or (``?stream=true``) its events after ``starting_after``."""
    gateway, store = gateway_of(request)
    await openai_principal(request)
    session_id, record, final = await _load(request)
    stream = request.query_params.get("stream") in ("true", "1")
    starting_after = _starting_after(request)
    if final is None or stream:
        stream_gone = not await gateway.redis.exists(gateway.keys.events(session_id))
        if stream_gone and final is None and _expired(gateway, record):
            final = _lost(record)
        if stream and stream_gone and final is not None:
            return Response(_replay_final(record, final, starting_after), media_type=_SSE)
    if stream:
        gateway.connections.ensure_accepting()
        return await _answer(request, session_id, record, starting_after, stream=True)
    if final is not None:
        return JSONResponse(final)
    return JSONResponse(await _snapshot(gateway, store, session_id, record))


def _expired(gateway: Gateway, record: dict[str, Any]) -> bool:
    """Past the longest a generation's stream can live, and no final object kept."""
    settings = gateway.settings
    lifetime_s = settings.stream_max_generation_s + settings.stream_retention_s
    return time.time() > float(record["base"]["created_at"]) + lifetime_s


def _lost(record: dict[str, Any]) -> dict[str, Any]:
    encoder = ResponsesEncoder(options_of(record))
    encoder.initial()
    snapshot = encoder.snapshot()
    snapshot["status"] = "failed"
    message = "the response's stream expired before its end was kept (stream_retention_s)"
    snapshot["error"] = {"code": "server_error", "message": message}
    return snapshot


def _replay_final(record: dict[str, Any], final: dict[str, Any], starting_after: int) -> bytes:
    """The events of a kept response whose session stream has expired (one delta per item:
    sequence numbers after the first events differ from the live stream's)."""
    encoder = ResponsesEncoder(options_of(record, starting_after))
    events = events_of_final(final, record["generation_id"])
    frames = [Frame(f"0-{i + 1}", "0", event) for i, event in enumerate(events)]
    return (encoder.preamble() or b"") + (encoder.encode([Batch(frames)]) or b"")


@openai_endpoint
async def cancel_response(request: Request) -> Response:
    """Stop a response; answers it once it has stopped (idempotent: an ended one as it is)."""
    gateway, store = gateway_of(request)
    await openai_principal(request, unsafe=True)
    session_id, record, final = await _load(request)
    if final is not None:
        return JSONResponse(final)
    await request_cancel(gateway.redis, gateway.keys, record["generation_id"], session_id)
    encoder = ResponsesEncoder(options_of(record))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_CANCEL_WAIT_S):
            await collect(request, session_id, encoder)
    snapshot = encoder.snapshot()
    if encoder.finished:
        await store.put_final(session_id, snapshot)
    else:  # no worker took it yet: it ends cancelled when one does
        snapshot["status"] = "cancelled"
    return JSONResponse(snapshot)


@openai_endpoint
async def delete_response(request: Request) -> Response:
    """Forget a stored response (a running one is cancelled first)."""
    gateway, store = gateway_of(request)
    await openai_principal(request, unsafe=True)
    session_id, record, final = await _load(request)
    if final is None:
        await request_cancel(gateway.redis, gateway.keys, record["generation_id"], session_id)
    await store.delete(session_id)
    response_id = RESPONSE_PREFIX + session_id
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
