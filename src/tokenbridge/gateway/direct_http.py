"""Direct writes for established event streams: uvicorn's HTTP protocol plus one ASGI extension.

Every ``send`` of an ASGI response passes Starlette's middleware wrappers and uvicorn's
``RequestResponseCycle.send`` (message checks, chunk framing, a ``join``) before its
``transport.write``: at a live model's pace that chain cost more than the write itself, once
per token per connection. :class:`DirectHttpProtocol` is uvicorn's httptools protocol that adds
``scope["extensions"]["tokenbridge.direct"]`` (itself) to each request, so that an SSE response
whose headers are out can write its body chunks straight to the socket
(:class:`DirectBody`), synchronously: the fan-out's ``deliver`` then writes to an idle
connection without waking its task at all (``gateway/pump.py``).

What stays uvicorn's: the status line and headers, the last chunk (``more_body=False``), keep-
alive, shutdown. Backpressure is uvicorn's flow control: :meth:`DirectBody.ready` is false while
the transport is paused (its buffer above the high-water mark) and :meth:`DirectBody.drain`
waits for it to resume. A client that goes away is reported by a callback rather than by a task
waiting in ``receive()`` (:meth:`DirectBody.on_lost`). Any other ASGI server (or uvicorn's h11
protocol, or a test's ``ASGITransport``) has no extension: responses fall back to ASGI sends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from uvicorn.protocols.http.flow_control import FlowControl

__all__ = ["EXTENSION", "Closable", "DirectBody", "DirectHttpProtocol", "LightEvent"]

log = logging.getLogger(__name__)

EXTENSION = "tokenbridge.direct"

_CRLF = bytes((13, 10))  # HTTP/1.1 chunk framing (RFC 9112, 7.1), not RESP: kept out of store/


class Closable(Protocol):
    """What is told when the client leaves: ``close("client_gone")`` (a ClientConnection)."""

    def close(self, reason: str) -> None: ...


try:  # uvicorn's httptools protocol needs httptools (a dependency of uvicorn[standard])
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - without httptools, uvicorn uses h11: ASGI sends only
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


class LightEvent:
    """``asyncio.Event`` as uvicorn uses it, without the deque of waiters (~700 bytes) that
    every ``asyncio.Event`` allocates up front: a list is made only when someone waits."""

    __slots__ = ("_flag", "_waiters")

    def __init__(self, flag: bool = False) -> None:
        self._flag = flag
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if not self._flag:
            self._flag = True
            for waiter in self._waiters or ():
                if not waiter.done():
                    waiter.set_result(True)

    def clear(self) -> None:
        self._flag = False

    async def wait(self) -> bool:
        if self._flag:
            return True
        waiter = self.add_waiter()
        try:  # one future per waiter: a cancelled waiter never cancels another
            await waiter
            return True
        finally:
            self.remove_waiter(waiter)

    def add_waiter(self) -> asyncio.Future[bool]:
        """A future resolved by the next :meth:`set` (for a caller that awaits it in its own
        frame, then calls :meth:`remove_waiter` whatever happened)."""
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        return waiter

    def remove_waiter(self, waiter: asyncio.Future[bool]) -> None:
        waiters = self._waiters
        if waiters is not None:
            waiters.remove(waiter)
            if not waiters:
                self._waiters = None


class _FlowControl(FlowControl):
    """uvicorn's flow control (same attributes and methods) on a :class:`LightEvent`."""

    def __init__(self, transport: asyncio.Transport) -> None:  # no super(): no asyncio.Event
        self.transport = transport
        self.read_paused = False
        self.write_paused = False
        self._writable = LightEvent(True)

    async def drain(self) -> None:
        await self._writable.wait()

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        if not self.write_paused:
            self.write_paused = True
            self._writable.clear()

    def resume_writing(self) -> None:
        if self.write_paused:
            self.write_paused = False
            self._writable.set()


class _Pipeline(list[Any]):
    """The protocol's queue of pipelined requests (``appendleft``/``pop``/truth, as uvicorn
    uses it): an empty list is ~600 bytes smaller than an empty deque."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


if HttpToolsProtocol is not None:

    class DirectHttpProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol; each request's scope carries it as an extension.

        Also lighter per connection (an idle stream holds it for hours): a list for the
        pipelined-requests queue and :class:`LightEvent` s rather than ``asyncio.Event`` s."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.pipeline = _Pipeline()  # type: ignore[assignment]
            # Set here, not only as a class default: an attribute first set later would turn
            # the instance's key-sharing dict into a plain one (~1.5 KB more per connection).
            self.on_lost: Closable | None = None  # set by a DirectBody

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.flow = _FlowControl(transport)

        def on_headers_complete(self) -> None:
            self.scope["extensions"] = {EXTENSION: self}  # type: ignore[dict-item]
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is not None and cycle.scope is self.scope:  # made just now, not started
                cycle.message_event = LightEvent()  # type: ignore[assignment]

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            target, self.on_lost = self.on_lost, None
            if target is not None:
                target.close("client_gone")

else:  # pragma: no cover
    DirectHttpProtocol = None  # type: ignore[assignment,misc]


class DirectBody:
    """The body of one started response, written straight to its transport (chunked if the
    response is). Only valid between ``http.response.start`` and the last ASGI body send."""

    __slots__ = ("chunked", "cycle", "flow", "protocol", "transport")

    def __init__(self, protocol: Any, cycle: Any) -> None:
        self.protocol = protocol
        self.cycle = cycle
        self.flow = cycle.flow
        self.transport = cycle.transport
        self.chunked = bool(cycle.chunked_encoding)

    @classmethod
    def open(cls, scope: Any) -> DirectBody | None:
        """For a response whose headers were sent through ASGI: None when the server has no
        such extension (or the request is not a plain streaming GET), so send through ASGI."""
        extensions = scope.get("extensions")
        protocol = extensions.get(EXTENSION) if extensions else None
        if protocol is None or scope.get("method") != "GET":
            return None
        cycle = protocol.cycle
        if cycle is None or cycle.scope is not scope or not cycle.response_started:
            return None
        if cycle.response_complete:
            return None
        return cls(protocol, cycle)

    def on_lost(self, target: Closable | None) -> None:
        """Call ``target.close("client_gone")`` once the client's connection is lost (at once
        if it already is; no callback object: a partial would cost ~250 bytes per stream);
        None unregisters it (always do, before the response ends: the connection may serve
        another request)."""
        if target is not None and (self.cycle.disconnected or self.transport.is_closing()):
            target.close("client_gone")
            return
        self.protocol.on_lost = target

    @property
    def lost(self) -> bool:
        return bool(self.cycle.disconnected) or self.transport.is_closing()

    def ready(self) -> bool:
        """Whether :meth:`write` may be called now: connected and not paused by flow control."""
        return not (self.flow.write_paused or self.cycle.disconnected)

    def write(self, chunk: bytes) -> None:
        """Write body bytes now (framed as one chunk when the response is chunked)."""
        if self.chunked:
            self.transport.write(b"%x%b%b%b" % (len(chunk), _CRLF, chunk, _CRLF))
        else:
            self.transport.write(chunk)

    async def drain(self) -> None:
        """Wait until flow control lets writes through again (or the client is gone)."""
        if self.flow.write_paused and not self.cycle.disconnected:
            await self.flow.drain()
