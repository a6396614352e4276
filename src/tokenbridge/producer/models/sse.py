"""sse_data: the ``data`` of each server-sent event of a provider's streamed answer.

Both HTTP adapters read Server-Sent Events (OpenAI-compatible APIs and Anthropic's Messages
API); this is the one parser. Multi-line data is joined by newlines; comments, ``event:``,
``id:`` and ``retry:`` carry nothing the adapters use.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

__all__ = ["sse_data"]


async def sse_data(lines: AsyncIterator[str]) -> AsyncGenerator[str, None]:
    """Yield the data of each event of ``lines`` (an ``aiter_lines()``)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)
