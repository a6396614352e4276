"""A minimal SSE client on raw asyncio sockets, cheap enough to keep up with the gateway.

The bench process holds up to a few hundred of these while a gateway process pushes hundreds
of thousands of events per second at them, so the per-event work is done by C-level bytes
methods over whole blocks (``count``, ``rfind``), never by a Python loop per event, except in
latency mode, where each token's send timestamp is parsed (a few thousand a second). It is
deliberately not an event parser (that is :mod:`tokenbridge.sse_parser`, one object per event,
too slow to keep up here): it counts the native encoding's markers in whole blocks.

The response body is HTTP/1.1 chunked (uvicorn writes one chunk per ``send``). A stream cut
by the server (``: closed slow_client``, a dropped socket) is resumed with ``Last-Event-ID``,
as a browser's EventSource would, and counted in :attr:`StreamTally.reconnects`.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import cast

__all__ = ["StreamTally", "follow"]

_TOKEN = b"\nevent: token\n"
_END = b"\nevent: end\n"
_ERROR = b"\nevent: error\n"
_CLOSED = b"\n: closed "
_GAP = b"\nevent: gap\n"
_TEXT_NS = re.compile(rb'"text":"(\d+)"')


@dataclass(eq=False)
class StreamTally:
    """What one client received from one session, across reconnects.

    Times are ``time.perf_counter()`` at the moment the bytes reached this process; with
    ``latency=True`` each token's text is read as the producer's ``time.time_ns()`` at send,
    and ``latencies_ns`` holds receipt minus that.
    """

    session_id: str
    latency: bool = False
    tokens: int = 0
    first_token_at: float | None = None
    end_at: float | None = None
    last_event_id: str | None = None
    reconnects: int = 0
    gaps: int = 0
    closed_reasons: list[str] = field(default_factory=list)
    latencies_ns: list[int] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def feed(self, block: bytes, now: float, wall_ns: int) -> None:
        """Account for ``block``: whole SSE messages (it ends with a blank line)."""
        self.subscribed.set()  # the first block is the ``retry:`` preamble
        text = b"\n" + block
        tokens = text.count(_TOKEN)
        if tokens:
            if self.first_token_at is None:
                self.first_token_at = now
            self.tokens += tokens
            if self.latency:
                self.latencies_ns.extend(wall_ns - int(m) for m in _TEXT_NS.findall(block))
        at = text.rfind(b"\nid: ")
        if at >= 0:
            self.last_event_id = text[at + 5 : text.index(b"\n", at + 5)].decode()
        if _GAP in text:
            self.gaps += text.count(_GAP)
        at = text.find(_CLOSED)
        if at >= 0:
            self.closed_reasons.append(text[at + 10 : text.index(b"\n", at + 10)].decode())
        if _END in text or _ERROR in text:
            self.end_at = now
            self.ended.set()


class _SSEProtocol(asyncio.Protocol):
    """One HTTP/1.1 GET of an event stream: headers, chunked body, SSE blocks into a tally."""

    def __init__(self, tally: StreamTally) -> None:
        self.tally = tally
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._head = bytearray()
        self._in_body = False
        self._chunked = False
        self._chunk_left = 0  # data bytes left in the current chunk
        self._skip = 0  # CRLF bytes left after a chunk's data
        self._size_line = b""
        self._events = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(f"connection lost: {exc}" if exc else "connection closed")

    def data_received(self, data: bytes) -> None:
        now, wall_ns = time.perf_counter(), time.time_ns()
        if not self._in_body:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._head[:end]).lower()
            data = bytes(self._head[end + 4 :])
            self._head.clear()
            self._in_body = True
            if not head.startswith((b"http/1.1 200", b"http/1.0 200")):
                self._fail(head.split(b"\r\n", 1)[0].decode(errors="replace"))
                return
            self._chunked = b"\r\ntransfer-encoding: chunked" in head
        if self._chunked:
            self._dechunk(data)
        else:
            self._events += data
        end = self._events.rfind(b"\n\n")
        if end >= 0:
            block = bytes(self._events[: end + 2])
            del self._events[: end + 2]
            self.tally.feed(block, now, wall_ns)
            if self.tally.ended.is_set() and self.transport is not None:
                self.transport.close()

    def _dechunk(self, data: bytes) -> None:
        pos, size = 0, len(data)
        while pos < size:
            if self._chunk_left:
                take = min(self._chunk_left, size - pos)
                self._events += data[pos : pos + take]
                pos += take
                self._chunk_left -= take
                if not self._chunk_left:
                    self._skip = 2
            elif self._skip:
                take = min(self._skip, size - pos)
                pos += take
                self._skip -= take
            else:
                eol = data.find(b"\n", pos)
                if eol < 0:
                    self._size_line += data[pos:]
                    return
                line = self._size_line + data[pos:eol]
                self._size_line = b""
                pos = eol + 1
                self._chunk_left = int(line.split(b";", 1)[0].strip(), 16)
                if not self._chunk_left:
                    return  # the last chunk: the server ended the response

    def _fail(self, status: str) -> None:
        if not self.lost.done():
            self.lost.set_exception(RuntimeError(f"event stream answered {status!r}"))
        if self.transport is not None:
            self.transport.close()


async def follow(host: str, port: int, tally: StreamTally, max_reconnects: int = 100) -> None:
    """Read ``tally.session_id``'s events until an ``end`` (or ``error``) event arrives.

    A stream that the server cuts is resumed from the last id received. Cancellation closes
    the socket and propagates.
    """
    loop = asyncio.get_running_loop()
    while True:
        _, protocol = await loop.create_connection(lambda: _SSEProtocol(tally), host, port)
        assert protocol.transport is not None
        headers = f"GET /v1/sessions/{tally.session_id}/events HTTP/1.1\r\nHost: {host}\r\n"
        headers += "Accept: text/event-stream\r\n"
        if tally.last_event_id is not None:
            headers += f"Last-Event-ID: {tally.last_event_id}\r\n"
        protocol.transport.write((headers + "\r\n").encode())
        try:
            await protocol.lost
        finally:
            protocol.transport.close()
        if tally.ended.is_set():
            return
        if tally.reconnects >= max_reconnects:
            raise RuntimeError(f"session {tally.session_id}: over {max_reconnects} reconnects")
        tally.reconnects += 1
