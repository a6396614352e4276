"""OpenAIChatModel: any OpenAI-compatible chat-completions API, streamed over httpx.

Owns one ``httpx.AsyncClient`` per model instance (bounded pool), closed by :meth:`aclose`.
Request: the messages as given (``developer`` sent as ``system``, which every compatible
server knows and OpenAI treats alike), and the params the API has: ``max_tokens``,
``temperature``, ``top_p``, ``stop``, ``seed``, ``user``, ``tools``, ``tool_choice``,
``parallel_tool_calls``, ``response_format``; tokenbridge's own (``rate``, ``cache``) never.

Promises: a Delta per non-empty ``choices[0].delta.content`` and a ToolCallDelta per entry of
``choices[0].delta.tool_calls`` (``id`` and ``function.name`` on a call's first fragment, then
``function.arguments`` pieces), in order, then one Finish after ``data: [DONE]`` with the last
``finish_reason`` (``stop``, ``length``, ``tool_calls``, ``content_filter``; the legacy
``function_call`` counts as ``tool_calls``, anything else as ``stop``) and the usage chunk, if
any.
Failures are raised with a stable ``code`` and a message that never contains the API key:

    provider_error          an ``{"error": ...}`` object inside the stream
    provider_unauthorized   HTTP 401 or 403
    provider_rate_limited   HTTP 429
    provider_http_4xx       any other 4xx
    provider_http_5xx       any 5xx
    provider_bad_response   another non-2xx status (1xx, 3xx), a chunk that is not JSON, a
                            body that cannot be decoded, or a stream that ends before [DONE]
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
from pydantic import BaseModel

from tokenbridge.exceptions import ProviderError
from tokenbridge.model_config import ModelConfig
from tokenbridge.producer.models.base import (
    FINISH_REASONS,
    ChatRequest,
    Delta,
    Finish,
    ToolCallDelta,
)
from tokenbridge.producer.models.provider_errors import ProviderErrors
from tokenbridge.producer.models.sse import sse_data

__all__ = ["DEFAULT_BASE_URL", "OpenAIChatModel"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=32)
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
_SAMPLING = ("max_tokens", "temperature", "top_p", "stop", "seed", "user", "parallel_tool_calls")
_NESTED = ("tools", "tool_choice", "response_format")


class OpenAIChatModel(ProviderErrors):
    """Chat completions from ``{base_url}/chat/completions`` (``base_url`` defaults to OpenAI).

    The API key is read once, here, from the variable named by ``config.api_key_env``.
    """

    def __init__(self, name: str, config: ModelConfig) -> None:
        self.name = name
        self.upstream = config.model or name
        self._url = httpx.URL(
            (config.base_url or DEFAULT_BASE_URL).rstrip("/") + "/chat/completions"
        )
        # Shown in messages: without userinfo or query, in case the URL carries credentials.
        self._where = str(self._url.copy_with(username=None, password=None, query=None))
        self._key_env = config.api_key_env
        key = config.api_key()
        self._secret = key.get_secret_value() if key else None
        headers = {"Accept": "text/event-stream"}
        if self._secret:
            headers["Authorization"] = f"Bearer {self._secret}"
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            limits=_LIMITS,
        )

    def __repr__(self) -> str:
        return f"OpenAIChatModel(name={self.name!r}, upstream={self.upstream!r})"

    async def aclose(self) -> None:
        """Close the HTTP client; open streams are cut."""
        await self._client.aclose()

    async def stream(
        self, request: ChatRequest
    ) -> AsyncGenerator[Delta | ToolCallDelta | Finish, None]:
        """POST the chat with ``stream: true`` and yield its tokens, then one Finish."""
        reason: str | None = None
        usage: dict[str, int] | None = None
        call_ids: list[str] = []  # ids of the calls seen, for servers that omit the index
        try:
            async with self._client.stream("POST", self._url, json=self._body(request)) as resp:
                if not resp.is_success:
                    raise await self._status_error(resp)
                async with aclosing(sse_data(resp.aiter_lines())) as events:
                    async for data in events:
                        if not data:
                            continue  # an empty keep-alive event
                        if data == "[DONE]":
                            yield Finish(_finish_reason(reason), usage)
                            return
                        chunk = self._parse(data)
                        usage = _usage(chunk.get("usage")) or usage
                        content, calls, reason = self._choice(chunk, reason, call_ids)
                        if content:
                            yield Delta(content)
                        for call in calls:
                            yield call
                raise self._bad_response("the stream ended before data: [DONE]")
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise self._transport_error(exc) from exc

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        messages = [
            {**m, "role": "system"} if m.get("role") == "developer" else m for m in request.messages
        ]
        body: dict[str, Any] = {
            "model": self.upstream,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        params = request.params
        for key in _SAMPLING:
            value = getattr(params, key)
            if value is not None:
                body[key] = value
        for key in _NESTED:
            value = getattr(params, key)
            if value is not None:
                body[key] = _plain(value)
        return body

    def _choice(
        self, chunk: dict[str, Any], reason: str | None, call_ids: list[str]
    ) -> tuple[str, list[ToolCallDelta], str | None]:
        """``choices[0].delta``'s text and call fragments, and the finish reason seen so far."""
        if chunk.get("error") is not None:
            raise ProviderError(
                f"model {self.name!r}: the provider reported an error mid-stream: "
                f"{self._error_message(chunk)}",
                code="provider_error",
            )
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return "", [], reason  # the usage chunk has no choices
        choice = choices[0]
        if not isinstance(choice, dict):
            raise self._bad_response("a choice is not an object")
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = {}
        content = delta.get("content")
        finish = choice.get("finish_reason")
        return (
            content if isinstance(content, str) else "",
            self._tool_calls(delta.get("tool_calls"), call_ids),
            finish if isinstance(finish, str) else reason,
        )

    def _tool_calls(self, value: object, call_ids: list[str]) -> list[ToolCallDelta]:
        """The call fragments of one delta; a fragment that says nothing is dropped.

        A fragment without ``index`` (some servers, e.g. older Ollama, send each call whole
        without one) belongs to the call its ``id`` names, or else to the last call.
        """
        if value is None:
            return []
        if not isinstance(value, list):
            raise self._bad_response("delta.tool_calls is not a list")
        calls = []
        for item in value:
            if not isinstance(item, dict):
                raise self._bad_response("a tool call fragment is not an object")
            index, call_id = item.get("index"), _str(item.get("id"))
            if type(index) is not int or index < 0:
                if call_id:
                    index = call_ids.index(call_id) if call_id in call_ids else len(call_ids)
                elif call_ids:
                    index = len(call_ids) - 1
                else:
                    raise self._bad_response("a tool call fragment has neither index nor id")
            if call_id and call_id not in call_ids:
                call_ids.append(call_id)
            function = item.get("function")
            function = function if isinstance(function, dict) else {}
            call = ToolCallDelta(
                index,
                arguments=_str(function.get("arguments")),
                call_id=call_id,
                name=_str(function.get("name")),
            )
            if call.arguments or call.call_id or call.name:
                calls.append(call)
        return calls

    def _parse(self, data: str) -> dict[str, Any]:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise self._bad_response(f"a chunk is not JSON: {self._excerpt(data)!r}") from None
        if not isinstance(chunk, dict):
            raise self._bad_response("a chunk is not a JSON object")
        return chunk

    def _error_message(self, payload: object) -> str:
        """The provider's own message from ``{"error": {"message": ...}}``, redacted."""
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return self._excerpt(error["message"])
        if isinstance(error, str):
            return self._excerpt(error)
        return self._excerpt(json.dumps(payload))


def _plain(value: object) -> object:
    """A params value as JSON-ready data (models dumped without their unset fields)."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _finish_reason(reason: str | None) -> str:
    if reason == "function_call":  # the pre-tools name of the same thing
        return "tool_calls"
    return reason if reason in FINISH_REASONS else "stop"


def _usage(value: object) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    usage = {k: value[k] for k in _USAGE_KEYS if type(value.get(k)) is int}
    if "prompt_tokens" not in usage or "completion_tokens" not in usage:
        return None
    usage.setdefault("total_tokens", usage["prompt_tokens"] + usage["completion_tokens"])
    return usage
