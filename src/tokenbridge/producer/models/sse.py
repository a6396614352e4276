"""sse_data: the ``data`` of each server-sent event of a provider's streamed answer.

Both HTTP adapters read Server-Sent Events (OpenAI-compatible APIs and Anthropic's Messages
API) through tokenbridge's one parser (:mod:`tokenbridge.sse_parser`). Multi-line data is
joined by newlines; comments, ``event:``, ``id:`` and ``retry:`` carry nothing the adapters use.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

from tokenbridge.sse_parser import parse_sse

__all__ = ["sse_data"]


async def sse_data(lines: AsyncIterator[str]) -> AsyncGenerator[str, None]:
    """Yield the data of each event of ``lines`` (an ``aiter_lines()``)."""
    async for message in parse_sse(lines, partial_at_end=True):
        yield message.data
