"""Exceptions of tokenbridge; catch the base class you care about.

TokenBridgeError            everything tokenbridge raises on purpose
├── ConfigurationError      bad settings: fix the named variable
├── RedisUnavailable        Redis cannot be reached or the embedded server failed to start
├── InvalidEntry            a stream entry breaks the wire format (docs/wire-format.md)
├── InvalidRequest          an HTTP request breaks the API's rules (carries a stable code)
├── ModelError              a model call failed
│   ├── ProviderError       the provider answered with an error
│   └── ProviderTimeout     the provider did not answer in time
├── AuthError               missing or wrong credentials
├── LimitExceeded           a configured bound was hit
├── Draining                this gateway process is shutting down: go to another node
├── APIError                the SDK: the gateway answered with an error status
│   ├── AuthenticationError 401: no API key or a wrong one
│   ├── PermissionDenied    403: the key or token does not cover this resource
│   ├── NotFound            404: no such generation, session or route
│   ├── RateLimited         429: a limit was hit; ``retry_after`` seconds, when known
│   └── ServerError         5xx: the gateway failed or is draining
└── APIConnectionError      the SDK: the gateway cannot be reached at the URL given
"""

from __future__ import annotations

__all__ = [
    "APIConnectionError",
    "APIError",
    "AuthError",
    "AuthenticationError",
    "ConfigurationError",
    "Draining",
    "InvalidEntry",
    "InvalidRequest",
    "LimitExceeded",
    "ModelError",
    "NotFound",
    "PermissionDenied",
    "ProviderError",
    "ProviderTimeout",
    "RateLimited",
    "RedisUnavailable",
    "ServerError",
    "TokenBridgeError",
]


class TokenBridgeError(Exception):
    """Base of every error tokenbridge raises on purpose."""


class ConfigurationError(TokenBridgeError):
    """A setting is invalid; the message names the variable and the fix."""


class RedisUnavailable(TokenBridgeError):
    """Redis cannot be reached, or the embedded server could not be started."""


class InvalidEntry(TokenBridgeError):
    """A stream entry breaks the wire format; readers report and skip it."""


class InvalidRequest(TokenBridgeError):
    """A request breaks the API's rules; ``code`` is stable, the message is for people."""

    def __init__(self, code: str, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status_code = status_code


class ModelError(TokenBridgeError):
    """A model call failed; ``code`` becomes the ``error`` event's code.

    ``retryable``: worth another try before the first token (connection refused, timeout,
    HTTP 429 or 5xx); ``retry_after_s``: the provider's ``Retry-After``, when it sent one;
    ``detail``: the provider's own error message, when it sent one.
    """

    code = "model_error"
    retryable = False
    retry_after_s: float | None = None
    detail: str | None = None

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ProviderError(ModelError):
    """The provider answered with an error (HTTP status or an error inside the stream)."""

    code = "provider_error"


class ProviderTimeout(ModelError):
    """The provider did not answer (connect or read) within the model's timeout."""

    code = "provider_timeout"


class AuthError(TokenBridgeError):
    """Credentials are missing or wrong (401), or do not cover the resource (403)."""

    def __init__(self, code: str, message: str, status_code: int = 401) -> None:
        super().__init__(message)
        self.code = code
        self.status_code = status_code


class LimitExceeded(TokenBridgeError):
    """A configured bound (size, rate, count) was hit; HTTP 429 with ``code``.

    ``retry_after_s``, when known, becomes the ``Retry-After`` header.
    """

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


class Draining(TokenBridgeError):
    """This gateway process is shutting down and takes no new request or connection.

    HTTP 503 with code ``draining`` (WebSocket: close 1012); retry at once on another node,
    where a stream resumes from its last event id.
    """

    code = "draining"


class APIError(TokenBridgeError):
    """The gateway answered an SDK call with an error status: ``status_code``, its stable
    ``code`` and its message (``{"error": {"code", "message"}}``)."""

    def __init__(self, code: str, message: str, status_code: int) -> None:
        super().__init__(message)
        self.code = code
        self.status_code = status_code


class AuthenticationError(APIError):
    """401: the API key is missing or wrong."""


class PermissionDenied(APIError):
    """403: the credentials do not cover this resource."""


class NotFound(APIError):
    """404: no such generation, session or route."""


class RateLimited(APIError):
    """429: a limit was hit; ``retry_after`` is the server's ``Retry-After`` in seconds."""

    def __init__(
        self, code: str, message: str, status_code: int = 429, retry_after: float | None = None
    ) -> None:
        super().__init__(code, message, status_code)
        self.retry_after = retry_after


class ServerError(APIError):
    """5xx: the gateway failed, or is draining (503): retry, or try another node."""


class APIConnectionError(TokenBridgeError):
    """The gateway cannot be reached at the URL given (refused, timed out, name unknown)."""
