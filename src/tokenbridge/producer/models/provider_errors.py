"""ProviderErrors: how an HTTP model adapter reports a provider's failures.

Shared by the OpenAI-compatible and Anthropic adapters: an HTTP status becomes a
:class:`ProviderError` with a stable code (``provider_unauthorized``, ``provider_rate_limited``,
``provider_http_4xx``, ``provider_http_5xx``, ``provider_bad_response``), a short excerpt of the
provider's answer and a hint; the API key is masked in every message. Each error also says
whether it is worth a retry before the first token (``retryable``: connect errors and
timeouts, a broken connection, HTTP 429 and 5xx) and carries the provider's ``Retry-After``
(``producer/models/retry.py`` acts on both).
"""

from __future__ import annotations

import json
import time
from email.utils import parsedate_to_datetime

import httpx

from tokenbridge.exceptions import ModelError, ProviderError, ProviderTimeout

__all__ = ["ProviderErrors"]

_EXCERPT_BYTES = 2048
_EXCERPT_CHARS = 200


class ProviderErrors:
    """Mixin: needs ``name``, ``_where`` (URL without secrets), ``_key_env``, ``_secret`` and
    ``_error_message(payload)`` (the provider's own error format)."""

    name: str
    _where: str
    _key_env: str | None
    _secret: str | None

    def _error_message(self, payload: object) -> str:
        raise NotImplementedError

    async def _status_error(self, resp: httpx.Response) -> ProviderError:
        raw = b""
        async for part in resp.aiter_bytes():  # the rest is dropped when the response closes
            raw += part
            if len(raw) >= _EXCERPT_BYTES:
                break
        text = raw[:_EXCERPT_BYTES].decode("utf-8", "replace")
        try:
            detail = self._error_message(json.loads(text))
        except ValueError:
            detail = self._excerpt(text)
        detail = detail.rstrip(".")
        status = resp.status_code
        if status in (401, 403):
            code, hint = "provider_unauthorized", self._key_hint()
        elif status == 429:
            code, hint = "provider_rate_limited", ""
        elif 400 <= status < 500:
            code, hint = "provider_http_4xx", ""
        elif status >= 500:
            code, hint = "provider_http_5xx", ""
        else:
            code, hint = "provider_bad_response", " Is base_url the API's /v1 URL?"
        error = ProviderError(
            f"model {self.name!r}: {self._where} answered HTTP {status}: {detail}.{hint}",
            code=code,
        )
        error.detail = f"HTTP {status}: {detail}"
        error.retryable = status == 429 or status >= 500
        error.retry_after_s = _retry_after(resp.headers.get("retry-after"))
        return error

    def _key_hint(self) -> str:
        if not self._key_env:
            return " No API key was sent: name its variable in the model entry's api_key_env."
        if not self._secret:
            return f" No API key was sent: {self._key_env} is not set."
        return f" Check the API key in {self._key_env}."

    def _transport_error(self, exc: Exception) -> ModelError:
        """A failure below HTTP (timeout, refused, broken connection, undecodable body)."""
        error: ModelError
        if isinstance(exc, httpx.TimeoutException):
            error = ProviderTimeout(
                f"model {self.name!r}: {self._where} did not answer in time "
                f"({type(exc).__name__}); raise timeout_s in its model entry if it is just slow"
            )
            error.retryable = isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
            return error
        if isinstance(exc, httpx.ConnectError):
            error = ProviderError(
                f"model {self.name!r}: cannot connect to {self._where}: {self._redact(str(exc))}."
                " Is the server running there?",
                code="provider_unreachable",
            )
            error.retryable = True
            return error
        if isinstance(exc, httpx.DecodingError):
            return self._bad_response(f"the body cannot be decoded: {exc}")
        error = ProviderError(
            f"model {self.name!r}: connection to {self._where} broke: "
            f"{type(exc).__name__}: {self._redact(str(exc))}",
            code="provider_disconnected",
        )
        error.retryable = True  # retried only before the first token, like every failure
        return error

    def _bad_response(self, what: str) -> ProviderError:
        return ProviderError(
            f"model {self.name!r}: {self._where} sent a bad stream: {what}",
            code="provider_bad_response",
        )

    def _excerpt(self, text: str) -> str:
        text = " ".join(text.split())
        if len(text) > _EXCERPT_CHARS:
            text = text[:_EXCERPT_CHARS] + "..."
        return self._redact(text) or "(empty body)"

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
