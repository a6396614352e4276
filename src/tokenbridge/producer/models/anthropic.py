"""AnthropicChatModel: the Anthropic Messages API (``POST {base_url}/messages``), streamed.

Owns one ``httpx.AsyncClient`` per model instance (bounded pool), closed by :meth:`aclose`.
System messages are joined into the top-level ``system`` field; the others go to
``messages`` in order. ``max_tokens`` is required by the API: :data:`DEFAULT_MAX_TOKENS` when
the request leaves it unset.

Promises: a Delta per non-empty ``text_delta`` of a ``content_block_delta`` event, in order,
then one Finish at ``message_stop`` with the ``stop_reason`` of ``message_delta``
(``max_tokens`` -> ``"length"``, anything else -> ``"stop"``) and the usage: input tokens from
``message_start`` (plus cache reads and writes), output tokens from ``message_delta``.
``ping`` events and content blocks other than text are skipped. Failures are raised with the
same stable codes as the OpenAI adapter, and a message that never contains the API key:

    provider_error          an ``error`` event inside the stream (e.g. ``overloaded_error``)
    provider_unauthorized   HTTP 401 or 403
    provider_rate_limited   HTTP 429
    provider_http_4xx       any other 4xx
    provider_http_5xx       any 5xx (Anthropic's 529 "overloaded" included)
    provider_bad_response   another non-2xx status, an event that is not a JSON object, a body
                            that cannot be decoded, or a stream that ends before message_stop
    provider_unreachable    the connection could not be made
    provider_disconnected   the connection broke mid-response
    provider_timeout        connect/read/pool timeout (ProviderTimeout)
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import httpx

from tokenbridge.exceptions import ProviderError
from tokenbridge.producer.models.base import ChatRequest, Delta, Finish
from tokenbridge.producer.models.provider_errors import ProviderErrors
from tokenbridge.producer.models.sse import sse_data
from tokenbridge.settings import ModelConfig

__all__ = ["ANTHROPIC_VERSION", "DEFAULT_BASE_URL", "DEFAULT_MAX_TOKENS", "AnthropicChatModel"]

DEFAULT_BASE_URL = "https://api.anthropic.com/v1"
ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
_LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=32)
_INPUT_KEYS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


class AnthropicChatModel(ProviderErrors):
    """Messages from ``{base_url}/messages`` (``base_url`` defaults to Anthropic's API).

    The API key is read once, here, from the variable named by ``config.api_key_env``, and
    sent as ``x-api-key``.
    """

    def __init__(self, name: str, config: ModelConfig) -> None:
        self.name = name
        self.upstream = config.model or name
        self._url = httpx.URL((config.base_url or DEFAULT_BASE_URL).rstrip("/") + "/messages")
        # Shown in messages: without userinfo or query, in case the URL carries credentials.
        self._where = str(self._url.copy_with(username=None, password=None, query=None))
        self._key_env = config.api_key_env
        key = config.api_key()
        self._secret = key.get_secret_value() if key else None
        headers = {"accept": "text/event-stream", "anthropic-version": ANTHROPIC_VERSION}
        if self._secret:
            headers["x-api-key"] = self._secret
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            limits=_LIMITS,
        )

    def __repr__(self) -> str:
        return f"AnthropicChatModel(name={self.name!r}, upstream={self.upstream!r})"

    async def aclose(self) -> None:
        """Close the HTTP client; open streams are cut."""
        await self._client.aclose()

    async def stream(self, request: ChatRequest) -> AsyncGenerator[Delta | Finish, None]:
        """POST the messages with ``stream: true`` and yield their text, then one Finish."""
        try:
            async with self._client.stream("POST", self._url, json=self._body(request)) as resp:
                if not resp.is_success:
                    raise await self._status_error(resp)
                state = _State()
                async with aclosing(sse_data(resp.aiter_lines())) as events:
                    async for data in events:
                        if not data:
                            continue
                        item = state.feed(self._parse(data), self)
                        if item is not None:
                            yield item
                            if isinstance(item, Finish):
                                return
                raise self._bad_response("the stream ended before message_stop")
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise self._transport_error(exc) from exc

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        system = [m["content"] for m in request.messages if m.get("role") == "system"]
        messages = [
            {"role": m["role"], "content": m["content"]}
            for m in request.messages
            if m.get("role") != "system"
        ]
        params = request.params
        body: dict[str, Any] = {
            "model": self.upstream,
            "messages": messages,
            "max_tokens": params.max_tokens or DEFAULT_MAX_TOKENS,
            "stream": True,
        }
        if system:
            body["system"] = "\n\n".join(system)
        if params.temperature is not None:
            body["temperature"] = params.temperature  # the API takes 0..1; it says so if not
        if params.top_p is not None:
            body["top_p"] = params.top_p
        if params.stop:
            body["stop_sequences"] = list(params.stop)
        return body  # seed: the API has none; rate and cache are tokenbridge's own

    def _parse(self, data: str) -> dict[str, Any]:
        try:
            event = json.loads(data)
        except ValueError:
            raise self._bad_response(f"an event is not JSON: {self._excerpt(data)!r}") from None
        if not isinstance(event, dict):
            raise self._bad_response("an event is not a JSON object")
        return event

    def _stream_error(self, event: dict[str, Any]) -> ProviderError:
        return ProviderError(
            f"model {self.name!r}: the provider reported an error mid-stream: "
            f"{self._error_message(event)}",
            code="provider_error",
        )

    def _error_message(self, payload: object) -> str:
        """The provider's own ``{"error": {"type": ..., "message": ...}}``, redacted."""
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            kind = error.get("type")
            prefix = f"{kind}: " if isinstance(kind, str) else ""
            return self._excerpt(prefix + error["message"])
        if isinstance(error, str):
            return self._excerpt(error)
        return self._excerpt(json.dumps(payload))


class _State:
    """What one stream has said so far: the stop reason and the usage figures."""

    def __init__(self) -> None:
        self.started = False
        self.reason: str | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None

    def feed(self, event: dict[str, Any], model: AnthropicChatModel) -> Delta | Finish | None:
        """The item one event yields, if any; raises on an ``error`` event."""
        kind = event.get("type")
        if kind == "error":
            raise model._stream_error(event)
        if kind == "message_start":
            self.started = True
            message = event.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                counts = [usage[k] for k in _INPUT_KEYS if type(usage.get(k)) is int]
                self.input_tokens = sum(counts) if counts else None
                self._output(usage)
        elif kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta":
                text = delta.get("text")
                if not isinstance(text, str):
                    raise model._bad_response("a text_delta has no text")
                return Delta(text) if text else None
        elif kind == "message_delta":
            delta = event.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            if isinstance(reason, str):
                self.reason = reason
            usage = event.get("usage")
            if isinstance(usage, dict):
                self._output(usage)
        elif kind == "message_stop":
            if not self.started:
                raise model._bad_response("message_stop came before message_start")
            return Finish("length" if self.reason == "max_tokens" else "stop", self.usage())
        return None  # ping, content_block_start/stop, and event types added later

    def _output(self, usage: dict[str, Any]) -> None:
        if type(usage.get("output_tokens")) is int:
            self.output_tokens = usage["output_tokens"]

    def usage(self) -> dict[str, int] | None:
        if self.input_tokens is None or self.output_tokens is None:
            return None
        return {
            "prompt_tokens": self.input_tokens,
            "completion_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }
