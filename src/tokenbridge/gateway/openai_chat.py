"""``POST /v1/chat/completions`` and its resume, ``GET /v1/chat/completions/{id}/stream``.

A completion is one generation submitted through the gateway's one submit path, in a session
of its own; the answer is that session's stream encoded as chat chunks (encoding
``openai_chat``, ``gateway/encodings/openai_chat.py``) or, without ``stream``, gathered into
one ``chat.completion``. The streamed answer names its resume URL in ``x-resume-url`` (and
``content-location``): ``GET`` it on any gateway node with the last SSE id received as
``Last-Event-ID`` and the rest of the same chunk stream follows (same ``id``, same
``created``), ending with the usage chunk (when asked for) and ``[DONE]``.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenbridge.exceptions import InvalidRequest
from tokenbridge.gateway import encodings
from tokenbridge.gateway.encodings.base import GenerationInfo, StreamContext
from tokenbridge.gateway.encodings.openai_chat import ChatCollector, ChatOptions
from tokenbridge.gateway.fanout import decode_entries
from tokenbridge.gateway.frames import Frame, parse_entry_id
from tokenbridge.gateway.openai_common import (
    StreamAnswer,
    collect,
    gateway_of,
    openai_principal,
    submit,
)
from tokenbridge.gateway.openai_errors import OpenAIParamError, openai_endpoint, openai_error
from tokenbridge.gateway.openai_requests import parse_chat
from tokenbridge.gateway.openai_store import CHAT_PREFIX, session_of
from tokenbridge.gateway.request_body import json_body
from tokenbridge.gateway.state import Gateway
from tokenbridge.wire.keys import ID_PATTERN

__all__ = ["create_chat_completion", "resume_chat_completion", "resume_url"]


def resume_url(completion_id: str) -> str:
    return f"/v1/chat/completions/{completion_id}/stream"


@openai_endpoint
async def create_chat_completion(request: Request) -> Response:
    """Start a completion; stream it as chunks or answer it whole."""
    gateway, store = gateway_of(request)
    gateway.connections.ensure_accepting()
    principal = await openai_principal(request, unsafe=True)
    body = parse_chat(await json_body(request))
    submitted = await submit(request, principal, body.model, body.messages, body.params)
    session_id = submitted.session_id
    completion_id = CHAT_PREFIX + session_id
    if not body.stream:
        collector = ChatCollector(completion_id, submitted.info)
        reason = await collect(request, session_id, collector)
        if not collector.finished:  # this gateway shut down, or the wait passed the idle bound
            message = f"the answer was interrupted ({reason}); retry, or stream it to resume"
            return openai_error(503, message, "answer_interrupted")
        if collector.error is not None:
            code, message = collector.error
            return openai_error(500, message, code)
        return JSONResponse(collector.completion())
    settings = gateway.settings
    record = {
        "generation_id": submitted.generation_id,
        "model": body.model,
        "created": submitted.created_s,
        "include_usage": body.include_usage,
    }
    ttl_s = settings.stream_max_generation_s + settings.stream_retention_s
    await store.put_chat(session_id, record, ttl_s)
    options = ChatOptions(completion_id, body.include_usage)
    encoder = encodings.get("openai_chat").open(
        StreamContext(session_id, options, submitted.info, retry_ms=gateway.stream_options.retry_ms)
    )
    url = resume_url(completion_id)
    headers = [("x-resume-url", url), ("content-location", url)]
    return StreamAnswer(request, session_id, encoder, None, headers)  # type: ignore[return-value]


async def _resumed_entry(
    gateway: Gateway, session_id: str, epoch: str, entry_id: str
) -> Frame | None:
    """The entry the client's Last-Event-ID is in (its later blocks may be missing), if the
    stream still holds it in that epoch."""
    async with gateway.redis.pipeline(transaction=False) as pipe:
        pipe.hget(gateway.keys.meta(session_id), "epoch")
        pipe.xrange(gateway.keys.events(session_id), min=entry_id, max=entry_id)
        current, entries = await pipe.execute()
    if current is None or current.decode() != epoch or not entries:
        return None
    frames = decode_entries(entries, epoch, session_id)
    return frames[0] if frames else None


def parse_chat_event_id(value: str | None) -> tuple[str, str, int] | None:
    """``<epoch>:<entry id>[.<k>]`` -> (epoch, entry id, k); None when absent; 400 if bad."""
    if not value:
        return None
    epoch, _, rest = value.partition(":")
    entry_id, _, block = rest.partition(".")
    try:
        if not ID_PATTERN.fullmatch(epoch) or (block and not block.isdigit()) or len(block) > 3:
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
    gateway, store = gateway_of(request)
    gateway.connections.ensure_accepting()
    await openai_principal(request)
    completion_id = request.path_params["completion_id"]
    session_id = session_of(completion_id, CHAT_PREFIX, "completion")
    resume = parse_chat_event_id(
        request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    )
    record = await store.chat(session_id)
    if record is None:
        raise InvalidRequest("completion_not_found", f"no completion {completion_id[:80]!r}", 404)
    last: tuple[str, str] | None = None
    resume_after = None
    pending = None
    if resume is not None:
        # History after that entry; the entry's own blocks after k first (usage, [DONE]).
        epoch, entry_id, block = resume
        last = (epoch, entry_id)
        resume_after = (entry_id, block)
        pending = await _resumed_entry(gateway, session_id, epoch, entry_id)
    info = GenerationInfo(record["generation_id"], record["model"], record["created"])
    options = ChatOptions(completion_id, record["include_usage"], resume_after, pending)
    ctx = StreamContext(
        session_id, options, info, resumed=resume is not None,
        retry_ms=gateway.stream_options.retry_ms,
    )  # fmt: skip
    encoder = encodings.get("openai_chat").open(ctx)
    return StreamAnswer(request, session_id, encoder, last)  # type: ignore[return-value]
