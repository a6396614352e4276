"""parse_sse: the one Server-Sent Events parser (text lines in, messages out).

Used wherever tokenbridge reads SSE: the model adapters (a provider's streamed answer,
``producer/models/sse.py``), the Python SDK (``client.py``) and the tests' client. It follows
the WHATWG rules where they matter here: ``data`` lines are joined by newlines, a message is
dispatched at a blank line if it had a ``data`` line, ``:`` starts a comment, a space after the
colon is dropped, unknown fields are ignored. One deliberate difference: :attr:`SSEMessage.id`
is the message's *own* ``id:`` (None when it has none, as tokenbridge's ``gap``), not the last
id seen, so a caller resuming with it never repeats an older one by mistake.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass

__all__ = ["SSEMessage", "parse_sse"]


@dataclass(slots=True)
class SSEMessage:
    """One dispatched message: its ``event`` name (``message`` by default), data and id."""

    event: str = "message"
    data: str = ""
    id: str | None = None


async def parse_sse(
    lines: AsyncIterable[str],
    *,
    comments: list[str] | None = None,
    partial_at_end: bool = False,
) -> AsyncGenerator[SSEMessage, None]:
    """Yield the messages of ``lines`` (e.g. httpx's ``aiter_lines()``).

    ``comments`` collects comment lines (without the colon, stripped). ``partial_at_end``
    yields a last message not followed by a blank line (providers that end the stream
    without one); by default it is dropped, as a browser does.
    """
    event, data, event_id = "message", list[str](), None
    async for line in lines:
        if not line:
            if data:
                yield SSEMessage(event, "\n".join(data), event_id)
            event, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            if comments is not None:
                comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            event_id = value
    if data and partial_at_end:
        yield SSEMessage(event, "\n".join(data), event_id)
