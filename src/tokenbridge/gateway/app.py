"""create_app(settings): the ASGI application and its lifespan.

The lifespan opens the :class:`Runtime` (Redis, optional worker and processors), then the
:class:`~tokenbridge.gateway.state.Gateway` (fan-out readers, auth, connections, admission)
before the first request, and closes both after the last, in reverse; an error there is a
failed startup. Errors become ``{"error": {"code", "message"}}`` JSON, never an HTML page or
a bare 500.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.resources
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from redis import exceptions as redis_exc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from tokenbridge.exceptions import AuthError, Draining, InvalidRequest, LimitExceeded
from tokenbridge.gateway import admin_api, api, dashboard, openai_routes, stats_api
from tokenbridge.gateway.asgi3 import coroutine_returning
from tokenbridge.gateway.openapi import openapi_schema
from tokenbridge.gateway.state import Gateway
from tokenbridge.presence import add_gateway
from tokenbridge.runtime import Runtime
from tokenbridge.settings import Settings

__all__ = ["create_app"]

log = logging.getLogger(__name__)

_REDIS_DOWN = (redis_exc.ConnectionError, redis_exc.TimeoutError, redis_exc.BusyLoadingError)
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _package_version() -> str:
    try:
        return importlib.metadata.version("tokenbridge")
    except importlib.metadata.PackageNotFoundError:
        return "0"


class _StreamEndpoint:
    """An endpoint run as a plain ASGI app (Starlette calls an object that is not a function
    as one): it skips ``request_response``, whose frames a stream would hold for its whole
    life (about 1 KB per open connection). Errors still reach the app's exception handlers
    (``ExceptionMiddleware`` wraps the router)."""

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.endpoint(Request(scope, receive, send))
        await response(scope, receive, send)


_SESSIONS = "/v1/sessions/"


def _stream_session(path: str, suffix: str) -> str | None:
    """The session of ``/v1/sessions/{session_id}<suffix>`` (the route's match), else None."""
    if not (path.startswith(_SESSIONS) and path.endswith(suffix)):
        return None
    session_id = path[len(_SESSIONS) : -len(suffix)]
    return session_id if session_id and "/" not in session_id else None


class _GatewayApp(Starlette):
    """Starlette, except that a native SSE or WebSocket stream skips the middleware and router
    frames, which an open stream would hold for its whole life (3-4 KB per connection). Errors
    get the same handlers (SSE: the same JSON bodies); with user middleware (CORS) or a root
    path everything goes the usual way."""

    @coroutine_returning
    def __call__(  # type: ignore[override]  # returns the coroutine: the same to an ASGI server
        self, scope: Scope, receive: Receive, send: Send
    ) -> Awaitable[None]:
        # Not a coroutine function: it returns the coroutine to await, so an open stream
        # holds no frame of this method (uvicorn is told interface="asgi3").
        kind = scope["type"]
        if not self.user_middleware and not scope.get("root_path"):
            if kind == "http" and scope["method"] == "GET":
                session_id = _stream_session(scope["path"], "/events")
                if session_id is not None:
                    scope["app"] = self
                    scope["path_params"] = {"session_id": session_id}
                    return self._stream(scope, receive, send)
            elif kind == "websocket":
                session_id = _stream_session(scope["path"], "/ws")
                if session_id is not None:
                    scope["app"] = self
                    scope["path_params"] = {"session_id": session_id}
                    return self._websocket(scope, receive, send)
        return super().__call__(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        try:
            await api.session_websocket(websocket)
        except Exception as exc:  # as Starlette does for a WebSocket: the handler, no body
            await self._handler(exc)(websocket, exc)

    def _handler(self, exc: Exception) -> Callable[..., Awaitable[Any]]:
        handler: Callable[..., Awaitable[Any]] = next(
            self.exception_handlers[cls]
            for cls in type(exc).__mro__
            if cls in self.exception_handlers
        )
        return handler

    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await api.session_events(request)
        except Exception as exc:  # before any byte was sent: the app's error response
            response = await self._handler(exc)(request, exc)
        del request
        await response(scope, receive, send)


def _index_html() -> str:
    return (importlib.resources.files("tokenbridge.gateway") / "static" / "index.html").read_text()


async def _index(request: Request) -> Response:
    code = request.query_params.get("login")
    if code:
        return await dashboard.login_link(request, code)  # an HTML page if the link failed
    return HTMLResponse(
        request.app.state.index_html,
        headers={
            "cache-control": "no-cache",
            "x-content-type-options": "nosniff",
            "referrer-policy": "no-referrer",
            "content-security-policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        },
    )


async def _no_icon(request: Request) -> Response:
    return Response(status_code=204)


async def _openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


async def _invalid_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidRequest)
    return api.error_response(exc.code, str(exc), exc.status_code)


async def _auth_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AuthError)
    response = api.error_response(exc.code, str(exc), exc.status_code)
    if exc.status_code == 401:
        response.headers["www-authenticate"] = 'Bearer realm="tokenbridge"'
    return response


async def _limit_exceeded(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LimitExceeded)
    response = api.error_response(exc.code, str(exc), 429)
    if exc.retry_after_s is not None:
        response.headers["retry-after"] = str(max(1, math.ceil(exc.retry_after_s)))
    return response


async def _draining(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Draining)
    response = api.error_response(exc.code, str(exc), 503)
    response.headers["retry-after"] = "1"
    response.headers["connection"] = "close"
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    response = api.error_response(code, str(exc.detail), exc.status_code)
    response.headers.update(exc.headers or {})  # e.g. Allow on a 405
    return response


async def _redis_down(request: Request, exc: Exception) -> Response:
    log.warning("redis unavailable path=%s error=%s", request.url.path, exc)
    return api.error_response("redis_unavailable", "Redis is not reachable; retry shortly", 503)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error path=%s", request.url.path, exc_info=exc)
    return api.error_response("internal_error", "internal error; see the server log", 500)


def create_app(settings: Settings, *, worker: bool | None = None) -> Starlette:
    """The gateway app; ``worker`` overrides ``settings.run_worker``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with Runtime(settings, worker=worker) as runtime:
            gateway = Gateway(
                settings,
                runtime.redis,
                url=runtime.url,
                node_id=runtime.node_id,
                client_name=runtime.client_name,
                models=runtime.models,
            )
            async with gateway:
                connections = gateway.connections

                def drain() -> None:
                    """Shutdown's first step (SIGTERM): refuse new requests and connections
                    (503, WebSocket 1012), close open ones with ``shutdown``, and stop this
                    process's worker taking jobs (running ones get ``shutdown_drain_s`` in
                    the lifespan exit)."""
                    if not connections.draining:
                        log.info("draining connections=%d", len(connections))
                    connections.drain("shutdown")
                    if runtime.worker is not None:
                        runtime.worker.stop()

                add_gateway(runtime.presence, gateway)  # presence.py: the dashboard's view
                app.state.runtime = runtime
                app.state.gateway = gateway
                app.state.connections = connections
                app.state.drain = drain
                try:
                    yield {"runtime": runtime, "gateway": gateway, "connections": connections}
                finally:
                    drain()

    routes = [
        Route("/", _index, methods=["GET"]),
        Route("/favicon.ico", _no_icon, methods=["GET"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/openapi.json", _openapi, methods=["GET"]),
        Route("/readyz", api.readyz, methods=["GET"]),
        Route("/v1/models", api.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.retrieve_model, methods=["GET"]),
        Route("/v1/auth/login", api.login, methods=["POST"]),
        Route("/v1/status", api.status, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/v1/generations", api.create_generation, methods=["POST"]),
        Route("/v1/generations/{generation_id}", api.cancel_generation, methods=["DELETE"]),
        Route(
            "/v1/sessions/{session_id}/events",
            _StreamEndpoint(api.session_events),
            methods=["GET"],
        ),
        WebSocketRoute("/v1/sessions/{session_id}/ws", api.session_websocket),
        *stats_api.routes,
        *admin_api.routes,  # admin over HTTP and the dashboard (gateway/admin_api.py)
        *dashboard.routes,
        *openai_routes.routes(_StreamEndpoint),
    ]
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=[
                    "authorization",
                    "content-type",
                    "last-event-id",
                    "api-key",
                    "x-api-key",
                ],
                expose_headers=["x-resume-url"],  # the OpenAI chat stream's resume URL
                max_age=600,
            )
        )
    app = _GatewayApp(
        middleware=middleware,
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            InvalidRequest: _invalid_request,
            LimitExceeded: _limit_exceeded,
            Draining: _draining,
            AuthError: _auth_error,
            HTTPException: _http_error,
            **dict.fromkeys(_REDIS_DOWN, _redis_down),
            Exception: _server_error,
        },
    )
    app.state.index_html = _index_html()
    app.state.openapi = openapi_schema(_package_version())
    app.state.settings = settings
    return app
