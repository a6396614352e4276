"""Python SDK: start a generation, stream its events (resuming by itself after a drop), cancel.

Named as the ``openai`` package names its clients: :class:`TokenBridgeClient` is synchronous,
:class:`AsyncTokenBridgeClient` has the same methods as coroutines::

    with TokenBridgeClient("http://127.0.0.1:8000", api_key="tbk_...") as tb:
        started = tb.start_generation("Tell me a story", model="demo")
        for event in tb.stream(started):
            if event.event == "token":
                print(event.data["text"], end="")

``stream`` follows one generation to its terminal event (``end`` or ``error``). When the
connection drops (or the node drains, 503) it reconnects with the last event id it saw, so
the caller gets every event once and in order; ``gap`` events (history lost) are passed
through. Errors are typed: :class:`AuthenticationError` (401), :class:`PermissionDenied`
(403), :class:`NotFound` (404), :class:`RateLimited` (429, ``retry_after``),
:class:`ServerError` (5xx), :class:`InvalidRequest` (other 4xx) and
:class:`APIConnectionError` (no gateway at that URL). Close an async stream you leave early
with ``contextlib.aclosing(tb.stream(started))``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from tokenbridge.exceptions import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    TokenBridgeError,
)
from tokenbridge.sse_parser import SSEMessage, iter_sse, parse_sse

__all__ = ["AsyncTokenBridgeClient", "GenerationStarted", "StreamEvent", "TokenBridgeClient"]

_TERMINAL = ("end", "error")


@dataclass(frozen=True, slots=True)
class GenerationStarted:
    """What ``POST /v1/generations`` answered."""

    session_id: str
    generation_id: str
    events_url: str


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One SSE event: its name, its JSON data and its id (None for ``gap``)."""

    event: str
    data: dict[str, Any]
    id: str | None


class _Resume:
    """One stream's resume state: the last event id, and when to give up reconnecting."""

    def __init__(self, started: GenerationStarted, last_event_id: str | None, limit: int) -> None:
        self.started = started
        self.last_event_id = last_event_id
        self.limit = limit
        self.attempts = 0

    def seen(self, event: StreamEvent) -> bool:
        """Note ``event``; False for an event of another generation of the session."""
        self.attempts = 0
        if event.id is not None:
            self.last_event_id = event.id
        return event.data.get("generation_id") in (None, self.started.generation_id)

    def headers(self) -> dict[str, str]:
        headers = {"accept": "text/event-stream"}
        if self.last_event_id:
            headers["last-event-id"] = self.last_event_id
        return headers

    def next_delay(self) -> float:
        """The wait before the next reconnect; raises once ``limit`` drops in a row."""
        self.attempts += 1
        if self.attempts > self.limit:
            raise APIConnectionError(
                f"lost the stream of {self.started.generation_id} {self.attempts} times in a "
                f"row; resume later with last_event_id={self.last_event_id!r}"
            )
        return float(min(2.0, 0.05 * 2**self.attempts) * random.uniform(0.5, 1.0))


_RESUMABLE = (httpx.TransportError, ServerError)


class _Options:
    """What both clients share: URL, HTTP options, request bodies, answers and error mapping.

    Only the I/O is written twice (a blocking and an async method of the same shape): the
    requests they send and how their answers read are built here and in the functions below.
    """

    def __init__(
        self, base_url: str, api_key: str | None, timeout_s: float, max_reconnects: int
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_reconnects = max_reconnects
        self.reconnects = 0
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        # Streams may stay silent between events for long: no read timeout.
        self._http_options: dict[str, Any] = {
            "base_url": self.base_url,
            "timeout": httpx.Timeout(timeout_s, read=None),
            "headers": headers,
        }

    @staticmethod
    def _body(
        prompt: str | None,
        model: str,
        messages: list[dict[str, str]] | None,
        session_id: str | None,
        params: dict[str, Any] | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model}
        if messages is not None:
            body["messages"] = messages
        else:
            body["prompt"] = prompt or ""
        if session_id is not None:
            body["session_id"] = session_id
        if params:
            body["params"] = params
        return body

    def _unreachable(self, exc: httpx.TransportError) -> APIConnectionError:
        return APIConnectionError(
            f"cannot reach tokenbridge at {self.base_url} ({type(exc).__name__}: "
            f"{str(exc) or 'no detail'}); is `tokenbridge serve` running there?"
        )


def _started(response: httpx.Response) -> GenerationStarted:
    if response.status_code != 202:
        raise _error_from(response)
    data = response.json()
    return GenerationStarted(data["session_id"], data["generation_id"], data["events_url"])


def _event(message: SSEMessage) -> StreamEvent:
    return StreamEvent(message.event, json.loads(message.data), message.id)


def _generation_id(generation: GenerationStarted | str) -> str:
    return generation.generation_id if isinstance(generation, GenerationStarted) else generation


def _cancelled(response: httpx.Response) -> bool:
    """True if the cancel was taken, False if the generation had already ended."""
    if response.status_code == 202:
        return True
    if response.status_code == 409:
        return False
    raise _error_from(response)


class TokenBridgeClient(_Options):
    """A synchronous client of one gateway; ``max_reconnects`` bounds resumes in a row.

    ``api_key`` is sent as a Bearer header to start and cancel generations; streams use the
    subscribe token that came with each generation (in its ``events_url``).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        max_reconnects: int = 20,
    ) -> None:
        super().__init__(base_url, api_key, timeout_s, max_reconnects)
        self._http = httpx.Client(**self._http_options)

    def __enter__(self) -> TokenBridgeClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def start_generation(
        self,
        prompt: str | None = None,
        *,
        model: str = "demo",
        messages: list[dict[str, str]] | None = None,
        session_id: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> GenerationStarted:
        """Queue a generation (``POST /v1/generations``)."""
        body = self._body(prompt, model, messages, session_id, params)
        return _started(self._send("POST", "/v1/generations", json=body))

    def cancel(self, generation: GenerationStarted | str) -> bool:
        """Ask the generation to stop (its stream ends with reason ``cancelled``); False if it
        had already ended."""
        gid = _generation_id(generation)
        return _cancelled(self._send("DELETE", f"/v1/generations/{gid}"))

    def stream(
        self, started: GenerationStarted, last_event_id: str | None = None
    ) -> Iterator[StreamEvent]:
        """Yield the generation's events to its ``end``/``error``, resuming after drops."""
        resume = _Resume(started, last_event_id, self.max_reconnects)
        while True:
            try:
                with contextlib.closing(self._read(resume)) as events:
                    for event in events:
                        if not resume.seen(event):
                            continue
                        yield event
                        if event.event in _TERMINAL:
                            return
            except _RESUMABLE:
                pass
            delay = resume.next_delay()
            self.reconnects += 1
            time.sleep(delay)

    def _read(self, resume: _Resume) -> Generator[StreamEvent, None, None]:
        url = resume.started.events_url
        with self._http.stream("GET", url, headers=resume.headers()) as response:
            if response.status_code != 200:
                response.read()
                raise _error_from(response)
            for message in iter_sse(response.iter_lines()):
                yield _event(message)


class AsyncTokenBridgeClient(_Options):
    """:class:`TokenBridgeClient` for asyncio: the same methods, as coroutines."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        max_reconnects: int = 20,
    ) -> None:
        super().__init__(base_url, api_key, timeout_s, max_reconnects)
        self._http = httpx.AsyncClient(**self._http_options)

    async def __aenter__(self) -> AsyncTokenBridgeClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    async def start_generation(
        self,
        prompt: str | None = None,
        *,
        model: str = "demo",
        messages: list[dict[str, str]] | None = None,
        session_id: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> GenerationStarted:
        """Queue a generation (``POST /v1/generations``)."""
        body = self._body(prompt, model, messages, session_id, params)
        return _started(await self._send("POST", "/v1/generations", json=body))

    async def cancel(self, generation: GenerationStarted | str) -> bool:
        """Ask the generation to stop; False if it had already ended."""
        gid = _generation_id(generation)
        return _cancelled(await self._send("DELETE", f"/v1/generations/{gid}"))

    async def stream(
        self, started: GenerationStarted, last_event_id: str | None = None
    ) -> AsyncIterator[StreamEvent]:
        """Yield the generation's events to its ``end``/``error``, resuming after drops."""
        resume = _Resume(started, last_event_id, self.max_reconnects)
        while True:
            try:
                async with contextlib.aclosing(self._read(resume)) as events:
                    async for event in events:
                        if not resume.seen(event):
                            continue
                        yield event
                        if event.event in _TERMINAL:
                            return
            except _RESUMABLE:
                pass
            delay = resume.next_delay()
            self.reconnects += 1
            await asyncio.sleep(delay)

    async def _read(self, resume: _Resume) -> AsyncGenerator[StreamEvent, None]:
        url = resume.started.events_url
        async with self._http.stream("GET", url, headers=resume.headers()) as response:
            if response.status_code != 200:
                await response.aread()
                raise _error_from(response)
            async with contextlib.aclosing(parse_sse(response.aiter_lines())) as messages:
                async for message in messages:
                    yield _event(message)


def _error_from(response: httpx.Response) -> TokenBridgeError:
    """The typed error of a non-2xx answer (``{"error": {"code", "message"}}``)."""
    status = response.status_code
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", f"HTTP {status}"
    if status == 401:
        return AuthenticationError(code, message, status)
    if status == 403:
        return PermissionDenied(code, message, status)
    if status == 404:
        return NotFound(code, message, status)
    if status == 429:
        return RateLimited(code, message, status, _retry_after(response))
    if status >= 500:
        return ServerError(code, message, status)
    if 400 <= status < 500:
        return InvalidRequest(code, message, status)
    return APIError(code, message, status)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None
