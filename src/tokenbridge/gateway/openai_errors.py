"""Errors of the OpenAI-compatible routes, in OpenAI's shape.

``{"error": {"message", "type", "param", "code"}}`` with the status codes the ``openai`` SDK
maps to its typed exceptions (400 ``BadRequestError``, 401 ``AuthenticationError``, 403
``PermissionDeniedError``, 404 ``NotFoundError``, 409 ``ConflictError``, 422
``UnprocessableEntityError``, 429 ``RateLimitError``, 5xx ``InternalServerError``). ``code``
is the same stable code the native API uses (docs/api.md); ``param`` names the offending
request parameter when there is one. :func:`openai_endpoint` wraps a route so that every
error it raises leaves in this shape (the app's handlers answer the native shape).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenbridge.exceptions import AuthError, Draining, InvalidRequest, LimitExceeded
from tokenbridge.store.client import REDIS_DOWN_ERRORS

__all__ = ["OpenAIParamError", "error_for", "openai_endpoint", "openai_error", "unsupported"]

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class OpenAIParamError(InvalidRequest):
    """A request parameter we cannot honour: 400 naming ``param`` (``n``, ``audio``, ...)."""

    def __init__(self, param: str, message: str, code: str = "unsupported_parameter") -> None:
        super().__init__(code, message, 400)
        self.param = param


def openai_error(
    status: int,
    message: str,
    code: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """One error response in OpenAI's shape."""
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def error_for(exc: Exception) -> JSONResponse:
    """The OpenAI-shaped response for an exception raised by a route."""
    if isinstance(exc, InvalidRequest):
        return openai_error(exc.status_code, str(exc), exc.code, getattr(exc, "param", None))
    if isinstance(exc, AuthError):
        headers = {"www-authenticate": 'Bearer realm="tokenbridge"'}
        return openai_error(exc.status_code, str(exc), exc.code, headers=headers)
    if isinstance(exc, LimitExceeded):
        retry = exc.retry_after_s if exc.retry_after_s is not None else 1.0
        headers = {"retry-after": str(max(1, math.ceil(retry)))}
        return openai_error(429, str(exc), exc.code, headers=headers)
    if isinstance(exc, Draining):
        return openai_error(503, str(exc), exc.code, headers={"retry-after": "1"})
    if isinstance(exc, REDIS_DOWN_ERRORS):
        log.warning("redis unavailable on an OpenAI route: %s", exc)
        return openai_error(503, "Redis is not reachable; retry shortly", "redis_unavailable")
    log.exception("unhandled error on an OpenAI route", exc_info=exc)
    return openai_error(500, "internal error; see the server log", "internal_error")


Endpoint = Callable[[Request], Awaitable[Response]]


def openai_endpoint(endpoint: Endpoint) -> Endpoint:
    """Wrap a route so that its errors answer in OpenAI's shape (a streaming response that
    already started reports errors inside the stream instead)."""

    @functools.wraps(endpoint)
    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as exc:  # every error leaves as JSON; cancellation is not caught
            return error_for(exc)

    return wrapped


def unsupported(param: str, what: str) -> OpenAIParamError:
    return OpenAIParamError(param, f"{what} is not supported by tokenbridge (param {param!r})")
