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

from collections.abc import AsyncGenerator, AsyncIterable, Generator, Iterable
from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEMessage", "iter_sse", "parse_sse"]


@dataclass(slots=True)
class SSEMessage:
    """One dispatched message: its ``event`` name (``message`` by default), data and id."""

    event: str = "message"
    data: str = ""
    id: str | None = None


class SSEDecoder:
    """The parser's state: :meth:`feed` it one line, get a message when one is dispatched.

    Shared by :func:`parse_sse` (async lines) and :func:`iter_sse` (sync lines, the sync SDK).
    """

    __slots__ = ("comments", "data", "event", "id")

    def __init__(self, comments: list[str] | None = None) -> None:
        self.comments = comments
        self.event, self.data = "message", list[str]()
        self.id: str | None = None

    def feed(self, line: str) -> SSEMessage | None:
        """The message that ``line`` dispatches, if it is the blank line ending one."""
        if not line:
            message = SSEMessage(self.event, "\n".join(self.data), self.id) if self.data else None
            self.event, self.data, self.id = "message", [], None
            return message
        if line.startswith(":"):
            if self.comments is not None:
                self.comments.append(line[1:].strip())
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self.data.append(value)
        elif name == "event":
            self.event = value
        elif name == "id":
            self.id = value
        return None

    def partial(self) -> SSEMessage | None:
        """A last message not followed by a blank line, if there is one."""
        return SSEMessage(self.event, "\n".join(self.data), self.id) if self.data else None


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
    decoder = SSEDecoder(comments)
    async for line in lines:
        if (message := decoder.feed(line)) is not None:
            yield message
    if partial_at_end and (message := decoder.partial()) is not None:
        yield message


def iter_sse(lines: Iterable[str]) -> Generator[SSEMessage, None, None]:
    """:func:`parse_sse` for sync lines (httpx's ``iter_lines()``); a partial end is dropped."""
    decoder = SSEDecoder()
    for line in lines:
        if (message := decoder.feed(line)) is not None:
            yield message
