"""``POST /v1/chat/completions`` and its resume, ``GET /v1/chat/completions/{id}/stream``.

A completion is one generation submitted to the job stream like any other, in a session of its
own; the answer is that session's stream encoded as chat chunks
(``gateway/encodings/openai_chat.py``) or, without ``stream``, gathered into one
``chat.completion``. The streamed answer names its resume URL in ``x-resume-url``
(and ``content-location``): ``GET`` it on any gateway node with the last SSE id received as
``Last-Event-ID`` and the rest of the same chunk stream follows (same ``id``, same
``created``), ending with the usage chunk (when asked for) and ``[DONE]``.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenbridge.exceptions import InvalidRequest
from tokenbridge.gateway.api import _json_body
from tokenbridge.gateway.encodings.openai_chat import ChatChunkEncoder, ChatCollector, ChatOptions
from tokenbridge.gateway.frames import Batch, parse_entry_id
from tokenbridge.gateway.openai_common import openai_principal, parts, submit
from tokenbridge.gateway.openai_errors import OpenAIParamError, openai_endpoint, openai_error
from tokenbridge.gateway.openai_requests import parse_chat
from tokenbridge.gateway.openai_store import CHAT_PREFIX, session_of
from tokenbridge.gateway.openai_stream import EncodedStreamResponse, collect
from tokenbridge.wire.keys import ID_PATTERN, new_session_id

__all__ = ["create_chat_completion", "resume_chat_completion", "resume_url"]

_MAX_U64 = 2**64 - 1


def resume_url(completion_id: str) -> str:
    return f"/v1/chat/completions/{completion_id}/stream"


class _Collecting:
    """The collector behind the Encoder interface that :func:`collect` drives."""

    def __init__(self, collector: ChatCollector) -> None:
        self.collector = collector
        self.finished = False

    def preamble(self) -> bytes | None:
        return None

    def gap(self, info: dict[str, Any]) -> bytes | None:
        self.collector.finished = self.finished = True
        self.collector.error = ("stream_gap", f"the answer's history was lost ({info['reason']})")
        return None

    def encode(self, batches: list[Batch]) -> bytes | None:
        for batch in batches:
            for frame in batch.frames:
                self.collector.add(frame.event)
        self.finished = self.collector.finished
        return None

    def keepalive(self) -> bytes | None:
        return None

    def closing(self, reason: str) -> bytes | None:
        return None


@openai_endpoint
async def create_chat_completion(request: Request) -> Response:
    """Start a completion; stream it as chunks or answer it whole."""
    runtime, manager, store = parts(request)
    manager.ensure_accepting()
    principal = await openai_principal(request, unsafe=True)
    body = parse_chat(await _json_body(request))
    session_id = new_session_id()
    submitted = await submit(request, principal, session_id, body.model, body.messages, body.params)
    settings = runtime.settings
    completion_id = CHAT_PREFIX + session_id
    options = ChatOptions(
        completion_id=completion_id,
        generation_id=submitted.generation_id,
        model=body.model,
        created=submitted.created_s,
        include_usage=body.include_usage,
        retry_ms=settings.sse_retry_ms,
    )
    address = request.client.host if request.client else None
    assert runtime.fanout is not None
    if not body.stream:
        conn = manager.create_connection(session_id, "sse", address)
        collector = ChatCollector(options)
        try:
            await collect(
                conn,
                runtime.fanout,
                _Collecting(collector),
                heartbeat_s=settings.sse_heartbeat_s,
                history_batch=settings.history_batch,
            )
        finally:
            manager.remove_connection(conn)
        if collector.error is not None:
            code, message = collector.error
            return openai_error(500, message, code)
        return JSONResponse(collector.completion())
    record = {
        "generation_id": submitted.generation_id,
        "model": body.model,
        "created": submitted.created_s,
        "include_usage": body.include_usage,
    }
    await store.put_chat(
        session_id, record, settings.stream_max_generation_s + settings.stream_retention_s
    )
    conn = manager.create_connection(session_id, "sse", address)
    url = resume_url(completion_id)
    return EncodedStreamResponse(  # type: ignore[return-value]  # a raw ASGI app
        conn,
        runtime.fanout,
        ChatChunkEncoder(options),
        None,
        heartbeat_s=settings.sse_heartbeat_s,
        history_batch=settings.history_batch,
        idle_timeout_s=settings.connection_idle_timeout_s,
        headers=[("x-resume-url", url), ("content-location", url)],
        on_close=manager.remove_connection,
    )


def _previous(entry_id: str) -> str | None:
    """The largest stream id below ``entry_id`` (None below the first possible id)."""
    ms, seq = parse_entry_id(entry_id)
    if seq > 0:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{_MAX_U64}" if ms > 0 else None


def parse_chat_event_id(value: str | None) -> tuple[str, str, int] | None:
    """``<epoch>:<entry id>[.<k>]`` -> (epoch, entry id, k); None when absent; 400 if bad."""
    if not value:
        return None
    epoch, _, rest = value.partition(":")
    entry_id, _, block = rest.partition(".")
    try:
        if not ID_PATTERN.fullmatch(epoch) or (block and not block.isdigit()):
            raise ValueError(value)
        parse_entry_id(entry_id)
    except ValueError:
        raise OpenAIParamError(
            "Last-Event-ID",
            "Last-Event-ID must be an SSE id this stream sent, like 'a1b2c3d4:1700000000000-0'",
            "invalid_last_event_id",
        ) from None
    return epoch, entry_id, int(block or 0)


@openai_endpoint
async def resume_chat_completion(request: Request) -> Response:
    """The rest of a streamed completion after ``Last-Event-ID`` (all of it without one)."""
    runtime, manager, store = parts(request)
    manager.ensure_accepting()
    await openai_principal(request)
    completion_id = request.path_params["completion_id"]
    session_id = session_of(completion_id, CHAT_PREFIX, "completion")
    record = await store.chat(session_id)
    if record is None:
        raise InvalidRequest("completion_not_found", f"no completion {completion_id[:80]!r}", 404)
    resume = parse_chat_event_id(
        request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    )
    last: tuple[str, str] | None = None
    resume_after = None
    if resume is not None:
        epoch, entry_id, block = resume
        previous = _previous(entry_id)
        last = (epoch, previous) if previous is not None else None
        resume_after = (entry_id, block)
    settings = runtime.settings
    options = ChatOptions(
        completion_id=completion_id,
        generation_id=record["generation_id"],
        model=record["model"],
        created=record["created"],
        include_usage=record["include_usage"],
        retry_ms=settings.sse_retry_ms,
        resume_after=resume_after,
    )
    address = request.client.host if request.client else None
    conn = manager.create_connection(session_id, "sse", address)
    assert runtime.fanout is not None
    return EncodedStreamResponse(  # type: ignore[return-value]  # a raw ASGI app
        conn,
        runtime.fanout,
        ChatChunkEncoder(options),
        last,
        heartbeat_s=settings.sse_heartbeat_s,
        history_batch=settings.history_batch,
        idle_timeout_s=settings.connection_idle_timeout_s,
        on_close=manager.remove_connection,
    )
