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
└── Draining                this gateway process is shutting down: go to another node
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConfigurationError",
    "Draining",
    "InvalidEntry",
    "InvalidRequest",
    "LimitExceeded",
    "ModelError",
    "ProviderError",
    "ProviderTimeout",
    "RedisUnavailable",
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
    """A model call failed; ``code`` becomes the ``error`` event's code."""

    code = "model_error"

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
