"""JSON endpoints: start generations, list models, health, readiness and status.

Every error is ``{"error": {"code": "...", "message": "..."}}`` with a fitting 4xx; ``code``
is stable (see docs/api.md), ``message`` is for people.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.websockets import WebSocket

from tokenbridge.exceptions import InvalidRequest
from tokenbridge.gateway import encodings
from tokenbridge.gateway.auth import COOKIE_NAME, Principal, key_principal, reader_principal
from tokenbridge.gateway.encodings.base import StreamContext
from tokenbridge.gateway.request_body import json_body
from tokenbridge.gateway.resume import parse_last_event_id
from tokenbridge.gateway.sse import EventStreamResponse
from tokenbridge.gateway.state import Gateway
from tokenbridge.gateway.submit import GenerationSpec
from tokenbridge.gateway.websocket import serve_websocket
from tokenbridge.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tokenbridge.metrics import render as render_metrics
from tokenbridge.producer.cancel import request_cancel
from tokenbridge.producer.jobs import Message
from tokenbridge.producer.models.base import GenerationParams
from tokenbridge.producer.worker import live_workers
from tokenbridge.runtime import Runtime
from tokenbridge.store.client import REDIS_DOWN_ERRORS
from tokenbridge.wire.keys import ID_PATTERN, validate_id

__all__ = ["GenerationRequest", "error_response"]


def error_response(code: str, message: str, status_code: int) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status_code)


class GenerationRequest(BaseModel):
    """Body of ``POST /v1/generations``: a ``prompt`` or chat ``messages``, not both."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
            ]
        },
    )

    model: str = Field(min_length=1, max_length=128)
    prompt: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1)
    session_id: str | None = Field(default=None, pattern=ID_PATTERN.pattern)
    params: GenerationParams = Field(default_factory=GenerationParams)
    background: bool = Field(
        default=False, description="Never cancel it as abandoned when no client reads it."
    )

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerationRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def chat_messages(self) -> list[Message]:
        if self.messages is not None:
            return self.messages
        return [Message(role="user", content=self.prompt or "")]


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.state.gateway
    return gateway


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.state.runtime
    return runtime


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


async def create_generation(request: Request) -> Response:
    """Queue a generation on the job stream and answer at once (202)."""
    gateway = _gateway(request)
    gateway.connections.ensure_accepting()  # 503 `draining` once this process shuts down
    principal = await key_principal(gateway.auth, request, unsafe=True)
    payload = await json_body(request)
    try:
        body = GenerationRequest.model_validate(payload)
    except ValidationError as exc:
        raise InvalidRequest("invalid_request", _validation_message(exc), 422) from None
    spec = GenerationSpec(
        model=body.model,
        messages=body.chat_messages(),
        params=body.params,
        session_id=body.session_id,
        background=body.background,
    )
    submission = await gateway.submit(principal.identity, spec)
    return JSONResponse(submission.to_json(), status_code=202)


async def session_events(request: Request) -> Response:
    """SSE stream of a session, resuming after ``Last-Event-ID`` / ``?last_event_id=``."""
    gateway = _gateway(request)
    session_id = validate_id(request.path_params["session_id"], "session_id")
    await reader_principal(gateway.auth, request, session_id)
    last = parse_last_event_id(
        request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    )
    address = request.client.host if request.client else None
    stream = gateway.open_stream(session_id, "sse", address)
    context = StreamContext(
        session_id, resumed=last is not None, retry_ms=gateway.stream_options.retry_ms
    )
    encoder = encodings.get("native_sse").open(context)
    return EventStreamResponse(stream, encoder, last)  # type: ignore[return-value]  # raw ASGI


async def cancel_generation(request: Request) -> Response:
    """Cancel a generation, wherever it runs: 202 while it stops, 409 if it already ended."""
    gateway = _gateway(request)
    await key_principal(gateway.auth, request, unsafe=True)
    generation_id = validate_id(request.path_params["generation_id"], "generation_id")
    outcome = await request_cancel(gateway.redis, gateway.keys, generation_id)
    if outcome == "not_found":
        raise InvalidRequest("generation_not_found", f"no generation {generation_id}", 404)
    if outcome == "finished":
        raise InvalidRequest("generation_finished", f"{generation_id} has already ended", 409)
    return JSONResponse({"generation_id": generation_id, "state": outcome}, status_code=202)


def session_websocket(websocket: WebSocket) -> Coroutine[Any, Any, None]:
    """WebSocket stream of a session (same events and ids as SSE) with resume and cancel.

    Returns :func:`serve_websocket`'s coroutine rather than awaiting it, with two slotted
    callables rather than closures: an open WebSocket holds no frame nor cells of this."""
    gateway: Gateway = websocket.state.gateway
    return serve_websocket(
        websocket,
        gateway.fanout,
        gateway.connections,
        _Cancel(gateway),
        _Authorize(gateway, websocket),
        gateway.stream_options,
        max_message_bytes=gateway.settings.limits_max_websocket_message_bytes,
    )


def _model_object(gateway: Gateway, name: str) -> dict[str, Any]:
    """A model of the table as OpenAI's Model object (``object``, ``created``, ``owned_by``),
    plus ``adapter``. ``created``: when this gateway loaded its model table."""
    adapter = gateway.settings.models[name].adapter
    created = gateway.started_s
    return {"id": name, "object": "model", "created": created, "owned_by": "tokenbridge",
            "adapter": adapter}  # fmt: skip


class _Cancel:
    """A WebSocket client's ``cancel`` command: True unless the generation is unknown."""

    __slots__ = ("gateway",)

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, session_id: str, generation_id: str) -> bool:
        gateway = self.gateway
        outcome = await request_cancel(gateway.redis, gateway.keys, generation_id, session_id)
        return outcome != "not_found"


class _Authorize:
    """Whether a WebSocket's client may read a session (raises :class:`AuthError` if not)."""

    __slots__ = ("gateway", "websocket")

    def __init__(self, gateway: Gateway, websocket: WebSocket) -> None:
        self.gateway = gateway
        self.websocket = websocket

    async def __call__(self, session_id: str) -> None:
        await reader_principal(self.gateway.auth, self.websocket, session_id)


async def list_models(request: Request) -> Response:
    """The model table, shaped as OpenAI's ``GET /v1/models`` list."""
    gateway = _gateway(request)
    await key_principal(gateway.auth, request)
    data = [_model_object(gateway, name) for name in sorted(gateway.settings.models)]
    return JSONResponse({"object": "list", "data": data})


async def retrieve_model(request: Request) -> Response:
    """One model of the table (OpenAI's ``GET /v1/models/{model}``); 404 ``unknown_model``."""
    gateway = _gateway(request)
    await key_principal(gateway.auth, request)
    name = request.path_params["model"]
    if name not in gateway.settings.models:
        known = ", ".join(sorted(gateway.settings.models))
        raise InvalidRequest("unknown_model", f"unknown model {name!r}; known: {known}", 404)
    return JSONResponse(_model_object(gateway, name))


async def healthz(request: Request) -> Response:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: Redis answers and at least one generation worker sent a heartbeat lately;
    503 ``draining`` once this process shuts down (load balancers stop sending it clients)."""
    gateway = _gateway(request)
    if gateway.connections.draining:
        return error_response("draining", "this gateway is shutting down", 503)
    try:
        await gateway.redis.ping()
        window_ms = int(max(15.0, gateway.settings.consumer_heartbeat_s * 3) * 1000)
        workers = await live_workers(gateway.redis, gateway.keys, window_ms)
    except REDIS_DOWN_ERRORS as exc:
        return error_response("redis_unavailable", f"redis does not answer: {exc}", 503)
    if workers == 0:
        return error_response("no_worker", "no generation worker sent a heartbeat lately", 503)
    return JSONResponse({"status": "ready", "redis": "ok", "workers": workers})


async def status(request: Request) -> Response:
    """This process's fan-out, connections and worker, for people and dashboards."""
    gateway, runtime = _gateway(request), _runtime(request)
    await key_principal(gateway.auth, request)
    fanout = gateway.fanout
    worker = runtime.worker
    body: dict[str, Any] = {
        "connections": gateway.connections.stats(),
        "fanout": {
            "node_id": fanout.node_id,
            "readers": fanout.reader_count,
            "sessions": fanout.session_count,
            **vars(fanout.stats),
        },
        "worker": None
        if worker is None
        else {
            "name": worker.name,
            "generations_done": worker.generations_done,
            "generations_abandoned": worker.generations_abandoned,
        },
        "consumers": runtime.consumers.status(),
        "groups": await runtime.consumers.group_status(runtime.keys.jobs),
        "dead_letters": await runtime.dead_letters.count(),
    }
    return JSONResponse(body)


def _console_response(request: Request, principal: Principal, response: Response) -> Response:
    response.set_cookie(
        COOKIE_NAME,
        _gateway(request).auth.console_cookie(principal),
        max_age=12 * 3600,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


async def login(request: Request) -> Response:
    """Exchange an API key for the console cookie (the page at / uses it)."""
    auth = _gateway(request).auth
    payload = await json_body(request)
    key = payload.get("api_key") if isinstance(payload, dict) else None
    if not isinstance(key, str) or len(key) > 200:
        raise InvalidRequest("invalid_request", 'send {"api_key": "tbk_..."}', 422)
    principal = await auth.check_key(key)
    return _console_response(request, principal, JSONResponse({"status": "ok"}))


async def login_link(request: Request, code: str) -> Response:
    """``/?login=<code>``: a one-time link from `tokenbridge serve`; sets the cookie."""
    principal = await _gateway(request).auth.use_login_code(code[:200])
    return _console_response(request, principal, RedirectResponse("/", status_code=303))


async def metrics(request: Request) -> Response:
    """Prometheus exposition of this process's counters (API key, like /v1/status)."""
    gateway = _gateway(request)
    await key_principal(gateway.auth, request)
    runtime = _runtime(request)
    trimmer = runtime.processor.trimmer if runtime.processor is not None else None
    body = render_metrics(
        gateway.connections,
        gateway.fanout.stats,
        runtime.consumers,
        runtime.worker,
        runtime.models,
        trimmer,
    )
    return Response(body, media_type=METRICS_CONTENT_TYPE)
