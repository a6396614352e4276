"""Direct writes and a lighter idle footprint for WebSockets on uvicorn's ``wsproto`` protocol.

:class:`DirectWSProtocol` is uvicorn's wsproto-based WebSocket protocol (lighter per connection
than its ``websockets``-based default: no per-connection ``asyncio.Queue`` of three deques nor
``asyncio.Event`` deques here either, see :class:`_LightQueue`), and it adds
``scope["extensions"]["tokenbridge.direct"]`` (itself): :class:`DirectFrames` writes a text
message as one frame straight to the socket, synchronously, so that the fan-out's ``deliver``
writes to an idle WebSocket without waking its task (``gateway/pump.py``), as for SSE
(``gateway/direct_http.py``).

Frames are built by hand (a server's frames are not masked) when permessage-deflate is off,
else by wsproto (which compresses). Only whole messages are written, so they never interleave
with the protocol's own frames (pings, close); nothing is written once a close was sent or
the transport pauses (flow control: the task then sends through ASGI, which waits for it).
"""

from __future__ import annotations

from typing import Any

from tokenbridge.gateway.direct_http import EXTENSION, LightEvent
from tokenbridge.gateway.wake_clock import call_later

__all__ = ["DirectFrames", "DirectWSProtocol", "text_frame"]

try:
    import wsproto.events
    from uvicorn.protocols.websockets.wsproto_impl import WSProtocol
except ImportError:  # pragma: no cover - without wsproto: uvicorn's default, ASGI sends only
    WSProtocol = None  # type: ignore[assignment,misc]


def text_frame(text: str) -> bytes:
    """One unmasked, final text frame (RFC 6455 section 5.2) carrying ``text``."""
    payload = text.encode()
    size = len(payload)
    if size < 126:
        return b"\x81" + bytes((size,)) + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


class _LightQueue:
    """The protocol's inbound queue (``put_nowait``/``get``/``empty``, as uvicorn uses it;
    unbounded as there, uvicorn pauses reading instead): a list made only while non-empty."""

    __slots__ = ("_items", "_ready")

    def __init__(self) -> None:
        self._items: list[Any] | None = None
        self._ready = LightEvent()

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = [item]
        else:
            self._items.append(item)
        self._ready.set()

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> Any:
        while not self._items:  # waits in this frame (not in LightEvent.wait's): ~230 B less
            self._ready.clear()
            waiter = self._ready.add_waiter()
            try:
                await waiter
            finally:
                self._ready.remove_waiter(waiter)
        items = self._items
        item = items.pop(0)
        if not items:
            self._items = None
        return item


class _LightDeque(list):  # type: ignore[type-arg]
    """What wsproto's ``Connection._events`` is used as (``append``, ``popleft``, truth):
    an empty list is ~60 bytes, an empty ``deque`` ~620 (it holds a 64-slot block)."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class _Handshaken:
    """Stands in for wsproto's ``H11Handshake`` once the connection is open, when all that
    ``WSConnection`` still asks of it is ``events()`` (none); frees its h11 connection, the
    request's headers and two deques (~2.5 KB per WebSocket)."""

    __slots__ = ()

    def events(self) -> Any:
        return iter(())


_HANDSHAKEN = _Handshaken()


def _forget_handshake(conn: Any) -> None:
    """Drop ``conn``'s handshake state, if wsproto is as expected (else leave it)."""
    handshake = getattr(conn, "handshake", None)
    connection = getattr(conn, "connection", None)
    if handshake is None or connection is None or getattr(handshake, "_events", True):
        return  # not open yet, or events still to read: leave it all as it is
    conn.handshake = _HANDSHAKEN
    events = getattr(connection, "_events", None)
    if events is not None and not events and not isinstance(events, _LightDeque):
        connection._events = _LightDeque()


if WSProtocol is not None:

    class DirectWSProtocol(WSProtocol):
        """uvicorn's wsproto protocol, lighter, with the direct-write extension."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.queue = _LightQueue()  # type: ignore[assignment]
            self.writable = LightEvent(True)  # type: ignore[assignment]
            # Set here although uvicorn sets it on connect: an attribute first set later
            # would turn the instance's key-sharing dict into a plain one (~1.5 KB more).
            self.scope = None  # type: ignore[assignment]

        def handle_connect(self, event: Any) -> None:
            super().handle_connect(event)
            self.scope["extensions"][EXTENSION] = self  # type: ignore[assignment]

        def start_keepalive(self) -> None:
            """Called once the accept is written: the handshake's state is done with."""
            _forget_handshake(self.conn)
            super().start_keepalive()

        def schedule_ping(self) -> None:
            """As uvicorn's, on the shared clock (``gateway/wake_clock.py``): no timer handle
            of the event loop per idle WebSocket (~350 bytes less)."""
            assert self.ping_interval is not None
            delay = max(0.0, self.ping_interval - self.last_ping_rtt)
            self.ping_timer = call_later(self.loop, delay, self.send_keepalive_ping)  # type: ignore[assignment]


else:  # pragma: no cover
    DirectWSProtocol = None  # type: ignore[assignment,misc]


class DirectFrames:
    """Text messages of one accepted WebSocket, written straight to its transport."""

    __slots__ = ("deflate", "protocol")

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.deflate = bool(protocol.config.ws_per_message_deflate)

    @classmethod
    def open(cls, scope: Any) -> DirectFrames | None:
        """For an accepted WebSocket on :class:`DirectWSProtocol`; else None (ASGI sends)."""
        extensions = scope.get("extensions")
        protocol = extensions.get(EXTENSION) if extensions else None
        if protocol is None or not protocol.handshake_complete or protocol.response_started:
            return None
        return cls(protocol)

    def ready(self) -> bool:
        """Open, no close sent, and not paused by flow control."""
        protocol = self.protocol
        return (
            protocol.writable.is_set()
            and not protocol.close_sent
            and not protocol.disconnected
            and not protocol.transport.is_closing()
        )

    def write(self, text: str) -> None:
        """Write one text message now (only when :meth:`ready`)."""
        protocol = self.protocol
        if self.deflate:  # wsproto compresses if the client negotiated it
            protocol.transport.write(protocol.conn.send(wsproto.events.Message(data=text)))
        else:
            protocol.transport.write(text_frame(text))

    async def drain(self) -> None:
        await self.protocol.writable.wait()
