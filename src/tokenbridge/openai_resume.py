"""Resumable Chat Completions streams from Python: the answer survives a dropped connection.

OpenAI's Chat Completions API has no resume; tokenbridge's has (docs/openai.md): every SSE block
carries an ``id:``, and the response names a resume URL (``x-resume-url``) that continues the
same chunk stream after a ``Last-Event-ID``, on any gateway node. The ``openai`` SDK hides SSE
ids, so this helper speaks the wire itself and yields the chunks as dicts, exactly those of one
uninterrupted stream, each once::

    from tokenbridge.openai_resume import astream_chat_completion

    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
            "stream_options": {"include_usage": True}}
    async for chunk in astream_chat_completion("http://localhost:8000/v1", "tbk_...", body):
        print(chunk["choices"][0]["delta"].get("content", "") if chunk["choices"] else "")

A connection that fails or ends before ``[DONE]`` is resumed (up to ``max_resumes`` times in a
row without progress); an error chunk raises :class:`ChatStreamError`; HTTP errors raise
``httpx.HTTPStatusError``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from tokenbridge.sse_parser import parse_sse

__all__ = ["ChatStreamError", "astream_chat_completion"]

_RETRYABLE = (httpx.TransportError, httpx.RemoteProtocolError)


class ChatStreamError(Exception):
    """The stream carried an error chunk (``{"error": {...}}``); ``error`` is its object."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message") or error.get("code") or "stream error")
        self.error = error


class _Cursor:
    """Where the stream is: the last complete block's id, the resume URL, whether it ended."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self.resume_url: str | None = None
        self.done = False


async def _read(response: httpx.Response, cursor: _Cursor) -> AsyncIterator[dict[str, Any]]:
    """The chunks of one response; a block cut off by a dropped connection is not yielded
    (the parser dispatches a block only at its blank line), so the resume repeats it."""
    async for message in parse_sse(response.aiter_lines()):
        if message.id is not None:
            cursor.last_id = message.id
        if message.data == "[DONE]":
            cursor.done = True
            return
        chunk = json.loads(message.data)
        if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
            raise ChatStreamError(chunk["error"])
        yield chunk


def _request(
    http: httpx.AsyncClient,
    cursor: _Cursor,
    base_url: str,
    body: dict[str, Any],
    headers: dict[str, str],
) -> httpx.Request:
    """The first POST, or the GET of the resume URL after the last block received."""
    if cursor.resume_url is None:
        url = base_url.rstrip("/") + "/chat/completions"
        return http.build_request("POST", url, json={**body, "stream": True}, headers=headers)
    resume_headers = dict(headers)
    if cursor.last_id is not None:
        resume_headers["last-event-id"] = cursor.last_id
    url = str(httpx.URL(base_url).join(cursor.resume_url))
    return http.build_request("GET", url, headers=resume_headers)


async def astream_chat_completion(
    base_url: str,
    api_key: str | None,
    body: dict[str, Any],
    *,
    max_resumes: int = 5,
    client: httpx.AsyncClient | None = None,
    timeout_s: float = 60.0,
) -> AsyncIterator[dict[str, Any]]:
    """Stream a chat completion's chunks, resuming after dropped connections."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    http = client or httpx.AsyncClient(timeout=timeout_s)
    cursor = _Cursor()
    failures = 0
    try:
        while not cursor.done:
            before = cursor.last_id
            try:
                request = _request(http, cursor, base_url, body, headers)
                response = await http.send(request, stream=True)
                try:
                    response.raise_for_status()
                    cursor.resume_url = cursor.resume_url or response.headers.get("x-resume-url")
                    async for chunk in _read(response, cursor):
                        yield chunk
                finally:
                    await response.aclose()
            except _RETRYABLE:
                if cursor.resume_url is None:
                    raise  # nothing to resume: the request itself failed
            if cursor.done:
                return
            if cursor.resume_url is None:
                raise ChatStreamError({"message": "the stream ended without a resume URL"})
            failures = 0 if cursor.last_id != before else failures + 1
            if failures > max_resumes:
                raise ChatStreamError({"message": f"no progress after {max_resumes} resumes"})
    finally:
        if client is None:
            await http.aclose()
