"""AnthropicChatModel: the Anthropic Messages API (``POST {base_url}/messages``), streamed.

Owns one ``httpx.AsyncClient`` per model instance (bounded pool), closed by :meth:`aclose`.
The request maps OpenAI's chat format to Anthropic's (``anthropic_messages.py``): system and
developer messages are joined into the top-level ``system``; assistant ``tool_calls`` become
``tool_use`` blocks and ``tool`` messages ``tool_result`` blocks; ``tools`` take the
``input_schema`` form and ``tool_choice`` auto/none/required/{function} becomes
auto/none/any/tool (``parallel_tool_calls: false`` sets ``disable_parallel_tool_use``);
``user`` goes to ``metadata.user_id``. ``max_tokens`` is required by the API:
:data:`DEFAULT_MAX_TOKENS` when the request leaves it unset.

Promises: a Delta per non-empty ``text_delta`` of a ``content_block_delta`` event, and a
ToolCallDelta per ``tool_use`` block start (call id and name) and per ``input_json_delta``
(argument text; ``{}`` for a call that streamed none), in order, then one Finish at
``message_stop`` with the ``stop_reason`` of ``message_delta`` (``end_turn``/``stop_sequence``
-> ``"stop"``, ``max_tokens`` -> ``"length"``, ``tool_use`` -> ``"tool_calls"``, ``refusal``
-> ``"content_filter"``, anything else -> ``"stop"``) and the usage: input tokens from
``message_start`` (plus cache reads and writes), output tokens from ``message_delta``.
``ping`` events and other content blocks (thinking, ...) are skipped. Failures are raised with the
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
    invalid_tool_arguments  the chat cannot be said in Anthropic's format (tool call arguments
                            that are not a JSON object); nothing is sent
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import httpx

from tokenbridge.exceptions import ProviderError
from tokenbridge.model_config import ModelConfig
from tokenbridge.producer.models.anthropic_messages import anthropic_request
from tokenbridge.producer.models.base import ChatRequest, Delta, Finish, ToolCallDelta
from tokenbridge.producer.models.provider_errors import ProviderErrors
from tokenbridge.producer.models.sse import sse_data

__all__ = ["ANTHROPIC_VERSION", "DEFAULT_BASE_URL", "DEFAULT_MAX_TOKENS", "AnthropicChatModel"]

DEFAULT_BASE_URL = "https://api.anthropic.com/v1"
ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
_LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=32)
_INPUT_KEYS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


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

    async def stream(
        self, request: ChatRequest
    ) -> AsyncGenerator[Delta | ToolCallDelta | Finish, None]:
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
        try:
            body = anthropic_request(request, self.upstream, DEFAULT_MAX_TOKENS)
        except ValueError as exc:
            raise ProviderError(
                f"model {self.name!r}: {exc}", code="invalid_tool_arguments"
            ) from None
        body["stream"] = True
        return body

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
    """What one stream has said so far: the stop reason, the usage figures, the tool calls."""

    def __init__(self) -> None:
        self.started = False
        self.calls: dict[int, int] = {}  # content block index -> tool call index
        self.call_args: set[int] = set()  # tool calls that got argument text
        self.reason: str | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None

    def feed(
        self, event: dict[str, Any], model: AnthropicChatModel
    ) -> Delta | ToolCallDelta | Finish | None:
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
        elif kind == "content_block_start":
            return self._block_start(event, model)
        elif kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta":
                text = delta.get("text")
                if not isinstance(text, str):
                    raise model._bad_response("a text_delta has no text")
                return Delta(text) if text else None
            if isinstance(delta, dict) and delta.get("type") == "input_json_delta":
                return self._arguments(event.get("index"), delta.get("partial_json"), model)
        elif kind == "content_block_stop":
            call = self.calls.get(event.get("index"))  # type: ignore[arg-type]
            if call is not None and call not in self.call_args:
                return ToolCallDelta(call, arguments="{}")  # a call without arguments
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
            return Finish(_STOP_REASONS.get(self.reason or "", "stop"), self.usage())
        return None  # ping, other blocks, and event types added later

    def _block_start(
        self, event: dict[str, Any], model: AnthropicChatModel
    ) -> ToolCallDelta | None:
        """A ``tool_use`` block opens a call: its id and name (arguments follow as deltas)."""
        block = event.get("content_block")
        if not isinstance(block, dict) or block.get("type") != "tool_use":
            return None
        index, call_id, name = event.get("index"), block.get("id"), block.get("name")
        if type(index) is not int or not isinstance(call_id, str) or not isinstance(name, str):
            raise model._bad_response("a tool_use block lacks its index, id or name")
        call = self.calls[index] = len(self.calls)
        given = block.get("input")
        arguments = json.dumps(given) if isinstance(given, dict) and given else ""
        if arguments:
            self.call_args.add(call)
        return ToolCallDelta(call, arguments=arguments, call_id=call_id, name=name)

    def _arguments(
        self, index: object, text: object, model: AnthropicChatModel
    ) -> ToolCallDelta | None:
        call = self.calls.get(index) if type(index) is int else None
        if call is None or not isinstance(text, str):
            raise model._bad_response("an input_json_delta outside a tool_use block")
        if not text:
            return None
        self.call_args.add(call)
        return ToolCallDelta(call, arguments=text)

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
